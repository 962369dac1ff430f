"""Word-level text attacks' shared machinery: splitting captions into words, the stop-word
list, word importance, and the greedy substitution search.

The search follows BERT-Attack as the vision-language attack literature runs it (Li et al.,
EMNLP 2020, §3; the Co-Attack and SGA implementations, research/attacks_nn.md B.2):

1. importance of word i = the objective's value when word i is replaced by ``[UNK]``;
2. visit words from the most to the least important, skipping stop words;
3. score every candidate substitution of that word in one batch (the current sentence is
   candidate 0) and keep the best; a change counts against the word budget;
4. stop when the budget of changed words is spent.

The objective (``score``) is supplied by the task and is maximised: e.g. the KL divergence of
the candidate's text embedding from the clean one (Co-Attack's ``BertAttack``), or the
negative cosine to the paired image (SGA's image-guided attack).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

UNKNOWN = "[UNK]"

#: English function words and fillers never substituted (as the stop lists of the Co-Attack
#: and SGA implementations do); written here, not copied.
STOP_WORDS = frozenset("""
a about above across after afterwards again against all almost alone along already also although
always am among amongst an and another any anyhow anyone anything anyway anywhere are around as
at be became because become becomes becoming been before beforehand behind being below beside
besides between beyond both but by can cannot could did do does doing done down due during each
either else elsewhere enough even ever every everyone everything everywhere except few for former
formerly from further had has have having he hence her here hereafter hereby herein hereupon hers
herself him himself his how however i if in indeed into is it its itself just latter latterly least
less many may me meanwhile might mine more moreover most mostly much must my myself namely neither
never nevertheless next no nobody none noone nor not nothing now nowhere of off often on once one
only onto or other others otherwise our ours ourselves out over own per perhaps please rather
same seem seemed seeming seems several she should since so some somehow someone something
sometime sometimes somewhere still such than that the their theirs them themselves then thence
there thereafter thereby therefore therein thereupon these they this those though through
throughout thru thus to together too toward towards under unless until up upon us very via was we
well were what whatever when whence whenever where whereafter whereas whereby wherein whereupon
wherever whether which while whither who whoever whole whom whose why will with within without
would yet you your yours yourself yourselves
""".split())

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")


def split_words(text: str) -> list[str]:
    """Lower-case words with punctuation removed and '-' and '/' as spaces (``pre_caption``)."""
    text = _PUNCTUATION.sub(" ", text.lower()).replace("-", " ").replace("/", " ")
    return text.split()


def join_words(words: Sequence[str]) -> str:
    return " ".join(words)


def changed_words(original: str, perturbed: str) -> int:
    """How many word positions differ (the budget an attack may not exceed)."""
    a, b = split_words(original), split_words(perturbed)
    if len(a) != len(b):
        return max(len(a), len(b))
    return sum(x != y for x, y in zip(a, b))


def greedy_substitution(text: str, score: Callable[[list[str]], torch.Tensor],
                        candidates: Callable[[list[str], int], list[str]], budget: int,
                        protected: frozenset[str] = STOP_WORDS) -> str:
    """Change at most ``budget`` words of ``text`` to maximise ``score``.

    ``score(texts)`` returns one value per text (batched); ``candidates(words, i)`` proposes
    replacement words for position ``i``. One text of :func:`greedy_substitutions`.
    """
    return greedy_substitutions([text], lambda texts, rows: score(texts),
                                lambda row, words, i: candidates(words, i), budget, protected)[0]


def greedy_substitutions(texts: Sequence[str], score: Callable[[list[str], list[int]], torch.Tensor],
                         candidates: Callable[[int, list[str], int], list[str]], budget: int,
                         protected: frozenset[str] = STOP_WORDS,
                         accept: Callable[[list[str], list[int]], Sequence[bool]] | None = None) -> list[str]:
    """The greedy search above for many texts at once, each text searched on its own.

    ``score(texts, rows)`` rates ``texts[j]`` as a replacement of text ``rows[j]`` (one value
    each); ``candidates(row, words, i)`` proposes replacement words for position ``i`` of
    text ``row``. Every round scores the candidates of all unfinished texts in one call, so
    the text encoder sees a few large batches instead of many small ones. Only positions the
    search may visit (not protected, alphanumeric) are ranked: the importance of the others
    would be computed and then skipped. Ties in importance go to the earlier word.

    ``accept(texts, rows)`` (optional) is a constraint on the search: it says, for each
    candidate text ``texts[j]`` of text ``rows[j]``, whether the edit may be made at all.
    Rejected candidates are never scored; a word whose candidates are all rejected is passed
    over like a word without candidates, and the search goes on to the next word. Without
    it every candidate is scored.
    """
    words = [split_words(text) for text in texts]
    current = [list(w) for w in words]
    scores = [0.0] * len(texts)
    changes = [0] * len(texts)
    visitable = [[i for i, w in enumerate(ws) if w not in protected and any(ch.isalnum() for ch in w)]
                 for ws in words]
    active = [row for row in range(len(texts)) if budget > 0 and visitable[row]]
    if not active:
        return list(texts)

    # importance of word i = the objective with word i replaced by [UNK]; the clean score last
    batch, owners = [], []
    for row in active:
        ws = words[row]
        batch += [join_words(ws[:i] + [UNKNOWN] + ws[i + 1:]) for i in visitable[row]] + [join_words(ws)]
        owners += [row] * (len(visitable[row]) + 1)
    values = score(batch, owners).tolist()
    order, start = {}, 0
    for row in active:
        count = len(visitable[row])
        importance, scores[row] = values[start:start + count], values[start + count]
        start += count + 1
        ranked = sorted(range(count), key=lambda j: -importance[j])  # stable: ties keep word order
        order[row] = [visitable[row][j] for j in ranked]
    cursor = dict.fromkeys(active, 0)

    def edited(row: int, position: int, word: str) -> str:
        cur = current[row]
        return join_words(cur[:position] + [word] + cur[position + 1:])

    while active:
        proposals, waiting = {}, list(active)
        while waiting:
            # the next word with candidates of every waiting text
            found = {}
            for row in waiting:
                while cursor[row] < len(order[row]):
                    position = order[row][cursor[row]]
                    cursor[row] += 1
                    options = [w for w in dict.fromkeys(candidates(row, current[row], position))
                               if w and w != words[row][position] and w not in protected]
                    if options:
                        found[row] = (position, options)
                        break
            waiting = []
            if accept is not None and found:
                asked = [(row, position, w) for row, (position, options) in found.items() for w in options]
                allowed = list(accept([edited(*a) for a in asked], [row for row, _, _ in asked]))
                kept: dict[int, list[str]] = {}
                for (row, _, w), ok in zip(asked, allowed):
                    if ok:
                        kept.setdefault(row, []).append(w)
                for row, (position, _) in list(found.items()):
                    if row in kept:
                        found[row] = (position, kept[row])
                    else:  # every candidate rejected: on to this text's next word
                        del found[row]
                        waiting.append(row)
            proposals.update(found)
        batch, owners = [], []
        for row in active:
            if row in proposals:
                position, options = proposals[row]
                batch += [edited(row, position, w) for w in options]
                owners += [row] * len(options)
        if not batch:
            break
        values = score(batch, owners).tolist()
        start, still = 0, []
        for row in active:
            if row not in proposals:
                continue
            position, options = proposals[row]
            found = values[start:start + len(options)]
            start += len(options)
            best = max(range(len(options)), key=lambda j: found[j])  # first of equal bests
            if found[best] > scores[row]:
                current[row][position] = options[best]
                scores[row] = found[best]
                changes[row] += 1
            if changes[row] < budget and cursor[row] < len(order[row]):
                still.append(row)
        active = still
    return [join_words(current[row]) if changes[row] else text for row, text in enumerate(texts)]


def objective_scores(objective) -> Callable[[list[str], list[int]], torch.Tensor]:
    """``score(texts, rows)`` for :func:`greedy_substitutions` from a text objective: its
    batched ``score_many(texts, rows)`` where it has one, else ``score(texts, row)`` per row."""
    many = getattr(objective, "score_many", None)
    if many is not None:
        return many

    def per_row(texts: list[str], rows: list[int]) -> torch.Tensor:
        values = torch.empty(len(texts))
        for row in dict.fromkeys(rows):
            picked = [j for j, r in enumerate(rows) if r == row]
            values[picked] = objective.score([texts[j] for j in picked], row).float().cpu()
        return values

    return per_row
