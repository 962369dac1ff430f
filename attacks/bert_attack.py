"""BERT-Attack as the vision-language attack literature runs it.

Li, Ma, Guo, Xue, Qiu, "BERT-ATTACK: Adversarial Attack Against BERT Using BERT", EMNLP 2020,
§3 (substitutes from a masked LM; multi-piece words ranked by perplexity, §3.2), in the
variant of Co-Attack (Zhang et al., ACM MM 2022, ``attack/bert_attack.py``) and SGA (Lu et al.,
ICCV 2023, ``attacker.py``) that MMCoA also trains with (research/attacks_nn.md B.2):

- one MLM forward pass over the unmasked caption (≤ 30 sub-tokens); for every position the
  top k = 10 tokens and their raw logits;
- word importance by replacing each word with ``[UNK]``; words visited from the most
  important, stop words skipped;
- a single-piece word's candidates are the top-k tokens at its position, cut at the first
  whose logit is below 0.3; a multi-piece word's are the combinations of the top 4 tokens of
  its pieces (first 24, words of at most 12 pieces), ranked by MLM perplexity; sub-word
  (``##``) candidates, stop words and the original are dropped;
- all candidates of a step are scored in one batch by the task's objective, the best kept;
  the budget (1 word by default) counts changed words.

For classification the objective is the KL shift of the class-prompt embeddings
(Co-Attack's unimodal ``BertAttack``, MMCoA's text attack); for retrieval each caption is
attacked against its own image (SGA's image-guided scoring). ``mlm`` names a transformers
model folder or cache entry (``bert-base-uncased``) or ``world`` for the world's small MLM.

``constraint`` (:mod:`attacks._constraints`) filters the candidates before they are scored:
``"auto"`` (default) keeps the meaning where the dataset has a parser (the world) and is
``"none"`` elsewhere; ``"none"`` is the vision-language protocol above; ``"meaning"`` keeps only
substitutions after which the dataset's parser reads the same attributes from the text
(Morris et al., Findings of EMNLP 2020, on meaning-changing swaps); ``"sentence-encoder"``
is BERT-Attack's own semantic constraint (Li et al. 2020, §3) as TextAttack's
``bert_attack_li_2020`` recipe sets it: cosine of a sentence encoder's embeddings of the
candidate and the original ≥ ``similarity``, 0.2 by default, the recipe's threshold (on the
Universal Sentence Encoder; mean-pooled BERT-style encoders give higher cosines to unrelated
texts, so with one of those a higher threshold binds more). ``encoder`` is the encoder's
local folder.
"""

from dataclasses import dataclass
from itertools import islice, product

import torch

from vlbench.api import attacks, check_range
from vlbench.evaluation.words import greedy_substitutions, objective_scores, split_words
from vlbench.monitor.cost import Work

from ._constraints import ConstrainedTextAttack
from ._mlm import load_masked_lm


@attacks.register("bert-attack")
class BertAttack(ConstrainedTextAttack):
    """Masked-LM word substitution under a word budget."""

    paper = "Li et al., EMNLP 2020 (BERT-Attack); VL variant of Co-Attack (ACM MM 2022) and SGA (ICCV 2023)"
    deterministic = True
    description = "masked-LM word substitutions of the most important words (1-word budget)"
    version = "1"

    @dataclass
    class Params:
        mlm: str = "bert-base-uncased"
        budget: int = 1
        top_k: int = 10
        threshold: float = 0.3
        max_length: int = 30
        piece_top: int = 4
        piece_combinations: int = 24
        max_pieces: int = 12
        constraint: str = "auto"   # "auto", "none", "meaning" or "sentence-encoder"
        similarity: float = 0.2    # sentence-encoder: least cosine to the original
        encoder: str = ""          # sentence-encoder: a local model folder

    def validate(self) -> None:
        super().validate()
        owner = f"attack {self.name}"
        check_range(owner, "budget", self.params.budget, 0, 1000)
        check_range(owner, "top_k", self.params.top_k, 1, 1000)
        check_range(owner, "max_length", self.params.max_length, 3, 512)

    def threat_model(self) -> dict:
        return {"modality": "text", "word_budget": self.params.budget, "level": "word", "mlm": self.params.mlm,
                **self.constraint_threat_model()}

    def prepare(self) -> None:
        super().prepare()
        self.mlm  # noqa: B018  (loads, or fails with a one-line error naming what to download)

    def work(self, task, images, texts, classes):
        # per text: its masked variants (about 9 visitable words), then up to top_k
        # candidates per round of the search, about two rounds per word of budget (measured
        # on world captions, tokenising and search included)
        return Work(text_forwards=texts * (12 + 2 * self.params.top_k) * max(1, self.params.budget))

    @property
    def mlm(self):
        if "_mlm" not in self.__dict__:
            self._mlm = load_masked_lm(self.params.mlm)
        return self._mlm

    def substitutes(self, words: list[str]) -> dict[int, list[str]]:
        """Candidate replacements for every word of the clean caption."""
        return self.substitutes_many([words])[0]

    def substitutes_many(self, captions: list[list[str]]) -> list[dict[int, list[str]]]:
        """:meth:`substitutes` of several captions, the MLM run on the new ones in batches.

        They depend only on the MLM, the words and the candidate parameters, so they are
        kept on the (shared) MLM: the captions every defense and every attack built on
        BERT-Attack see go through the MLM once per process.
        """
        mlm, p = self.mlm, self.params
        keys = [(p.top_k, p.threshold, p.max_length, p.piece_top, p.piece_combinations, p.max_pieces, tuple(words))
                for words in captions]
        missing = list(dict.fromkeys(key for key in keys if key not in mlm.memo))
        if missing:
            pieces = [mlm.word_pieces(list(key[-1]), p.max_length) for key in missing]
            for key, (_, spans), (values, indices) in zip(missing, pieces,
                                                          mlm.top_k_many([ids for ids, _ in pieces], p.top_k)):
                mlm.memo[key] = self._options(spans, values, indices)
        return [mlm.memo[key] for key in keys]

    def _options(self, spans: list[tuple[int, int]], values: torch.Tensor, indices: torch.Tensor) -> dict[int, list[str]]:
        mlm, p = self.mlm, self.params
        result = {}
        for position, (start, end) in enumerate(spans):
            if end - start == 1:
                options = []
                for value, token_id in zip(values[start].tolist(), indices[start].tolist()):
                    if value < p.threshold:
                        break
                    options.append(mlm.token(token_id))
            elif 1 < end - start <= p.max_pieces:
                tops = [indices[i, :p.piece_top].tolist() for i in range(start, end)]
                combinations = torch.tensor(list(islice(product(*tops), p.piece_combinations)))
                ranked = combinations[mlm.perplexity(combinations).argsort()]
                options = [mlm.join(row.tolist()) for row in ranked]
            else:
                options = []
            result[position] = [o for o in options if o and "##" not in o and " " not in o.strip()]
        return result

    def perturb_texts(self, victim, objective, generator):
        texts = list(objective.texts)
        if self.params.budget == 0:
            return texts
        accept = self.acceptor(objective)
        options = self.substitutes_many([split_words(text) for text in texts])
        return greedy_substitutions(texts, objective_scores(objective),
                                    lambda row, words, i: options[row].get(i, []), self.params.budget,
                                    accept=accept)
