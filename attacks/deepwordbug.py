"""DeepWordBug: character-level edits of the most important words.

Gao, Lanchantin, Soffa, Qi, "Black-box Generation of Adversarial Text Sequences to Evade Deep
Learning Classifiers", IEEE S&P Workshops 2018, §3 (the four transformations — swap two
adjacent characters, substitute, delete or insert a random character — applied to words
ranked by importance); search as TextAttack's ``deepwordbug_gao_2018`` recipe runs it
(greedy over word importance; research/attacks_nn.md B.2), with the word importance,
stop words and budget of the BERT-Attack search used in vision-language attacks so the two
text attacks differ only in how they propose substitutes. Needs no language model.
For classification it perturbs the class prompts (as MMCoA's text attack does); for
retrieval each caption against its own image.

``constraint`` (:mod:`attacks._constraints`) filters the edits before they are scored:
``"auto"`` (default) keeps the meaning where the dataset has a parser (the world) and is
``"none"`` elsewhere; ``"none"`` is the recipe above; ``"meaning"`` keeps only edits after which the
dataset's parser reads the same attributes from the text (a misspelt attribute word is no
longer that attribute: Morris et al., Findings of EMNLP 2020, on meaning-changing edits);
``"sentence-encoder"`` keeps edits whose sentence-encoder cosine to the original is at least
``similarity`` (Li et al., EMNLP 2020, §3; TextAttack's ``bert_attack_li_2020`` recipe).
DeepWordBug's own recipe has no such constraint; the default 0.8 is the threshold of
TextAttack's character-level TextBugger recipe (research/attacks_nn.md B.2).
"""

from dataclasses import dataclass

import torch

from vlbench.api import attacks, check_range
from vlbench.evaluation.words import greedy_substitutions, objective_scores
from vlbench.monitor.cost import Work

from ._constraints import ConstrainedTextAttack

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def character_edits(word: str, generator: torch.Generator, per_operation: int) -> list[str]:
    """Random swap / substitute / delete / insert edits of ``word`` (seeded)."""

    def pick(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=generator))

    edits = []
    for _ in range(per_operation):
        if len(word) >= 2:
            i = pick(len(word) - 1)
            edits.append(word[:i] + word[i + 1] + word[i] + word[i + 2:])
        i = pick(len(word))
        edits.append(word[:i] + LETTERS[pick(26)] + word[i + 1:])
        if len(word) >= 2:
            i = pick(len(word))
            edits.append(word[:i] + word[i + 1:])
        i = pick(len(word) + 1)
        edits.append(word[:i] + LETTERS[pick(26)] + word[i:])
    return edits


@attacks.register("deepwordbug")
class DeepWordBug(ConstrainedTextAttack):
    """Greedy character-level edits of up to ``budget`` words."""

    paper = "Gao et al., IEEE S&P Workshops 2018 (DeepWordBug)"
    description = "character swaps/substitutions/deletions/insertions in the most important words"
    version = "1"

    @dataclass
    class Params:
        budget: int = 1            # words that may change
        edits_per_operation: int = 3
        constraint: str = "auto"   # "auto", "none", "meaning" or "sentence-encoder"
        similarity: float = 0.8    # sentence-encoder: least cosine to the original
        encoder: str = ""          # sentence-encoder: a local model folder

    def validate(self) -> None:
        super().validate()
        owner = f"attack {self.name}"
        check_range(owner, "budget", self.params.budget, 0, 1000)
        check_range(owner, "edits_per_operation", self.params.edits_per_operation, 1, 100)

    def threat_model(self) -> dict:
        return {"modality": "text", "word_budget": self.params.budget, "level": "character",
                **self.constraint_threat_model()}

    def work(self, task, images, texts, classes):
        edits = 4 * self.params.edits_per_operation  # four operations
        return Work(text_forwards=texts * (9 + edits) * max(1, self.params.budget))

    def perturb_texts(self, victim, objective, generator):
        per_op = self.params.edits_per_operation
        return greedy_substitutions(list(objective.texts), objective_scores(objective),
                                    lambda row, words, i: character_edits(words[i], generator, per_op),
                                    self.params.budget, accept=self.acceptor(objective))
