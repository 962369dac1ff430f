"""What every text attack promises: at most its word budget changes, a zero budget changes
nothing, the same seed gives the same texts, and the objective rises over the clean texts."""

import pytest
import torch

from vlbench import api
from vlbench.evaluation.objectives import EmbeddingShiftObjective, ImageGuidedTextObjective
from vlbench.evaluation.words import changed_words, greedy_substitution, greedy_substitutions, split_words

TEXT_ATTACKS = ["deepwordbug"]
PROMPTS = ["a photo of a red circle.", "a small blue square on a striped background.",
           "this is a photo of a green triangle", "a large yellow star in the top left"]


@pytest.fixture(scope="module")
def objective(tiny_victim):
    return EmbeddingShiftObjective(tiny_victim, PROMPTS, tiny_victim.encode_texts(PROMPTS))


def attack_texts(name, victim, objective, seed=0, **params):
    attack = api.build("attacks", name, params)
    return attack.perturb_texts(victim, objective, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TEXT_ATTACKS)
@pytest.mark.parametrize("budget", [1, 2])
def test_word_budget(tiny_victim, objective, name, budget):
    adversarial = attack_texts(name, tiny_victim, objective, budget=budget)
    assert len(adversarial) == len(PROMPTS)
    assert all(changed_words(a, b) <= budget for a, b in zip(PROMPTS, adversarial))
    assert any(changed_words(a, b) > 0 for a, b in zip(PROMPTS, adversarial))


@pytest.mark.parametrize("name", TEXT_ATTACKS)
def test_zero_budget_changes_nothing(tiny_victim, objective, name):
    assert attack_texts(name, tiny_victim, objective, budget=0) == PROMPTS


@pytest.mark.parametrize("name", TEXT_ATTACKS)
def test_same_seed_same_texts(tiny_victim, objective, name):
    assert attack_texts(name, tiny_victim, objective, seed=5) == attack_texts(name, tiny_victim, objective, seed=5)


@pytest.mark.parametrize("name", TEXT_ATTACKS)
def test_raises_the_objective(tiny_victim, objective, name):
    adversarial = attack_texts(name, tiny_victim, objective)
    for row, (clean, attacked) in enumerate(zip(PROMPTS, adversarial)):
        before, after = objective.score([clean, attacked], row).tolist()
        assert after >= before
    assert any(objective.score([a], r).item() > objective.score([c], r).item() + 1e-9
               for r, (c, a) in enumerate(zip(PROMPTS, adversarial)))


def test_greedy_search_picks_the_best_candidate_of_the_most_important_word():
    # A hand-checked example: the score counts the letter z and jumps by 10 once "cat" is gone,
    # so masking "cat" moves it most: "cat" is the most important word and is changed first,
    # to its best candidate "zzz" (13 beats "cap"'s 10); a second word of budget takes "dog".
    def score(texts):
        return torch.tensor([t.count("z") + 10.0 * ("cat" not in t) for t in texts])

    proposals = {"cat": ["cap", "zzz"], "dog": ["dig", "zoz"]}
    result = greedy_substitution("The cat and the dog.", score, lambda words, i: proposals.get(words[i], []), 1)
    assert result == "the zzz and the dog"
    assert greedy_substitution("The cat and the dog.", score, lambda w, i: proposals.get(w[i], []), 2) == \
        "the zzz and the zoz"


def test_stop_words_are_never_changed():
    def score(texts):
        return torch.tensor([float(len(t)) for t in texts])

    result = greedy_substitution("a cat of the dog", score, lambda words, i: ["xxxxxxxxx"], 5)
    assert [w for w in split_words(result) if w == "xxxxxxxxx"] == ["xxxxxxxxx", "xxxxxxxxx"]
    assert split_words(result)[0] == "a" and split_words(result)[2] == "of"


def test_image_guided_objective_is_negative_cosine(tiny_victim):
    images = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    objective = ImageGuidedTextObjective(tiny_victim, PROMPTS[:2], images)
    expected = -(tiny_victim.encode_texts(PROMPTS[:1]) @ images[0])
    assert torch.allclose(objective.score(PROMPTS[:1], 0), expected)


def test_batched_search_makes_the_same_choices_as_one_text_at_a_time():
    import random

    rng = random.Random(0)
    texts = [" ".join(rng.choice(["cat", "dog", "the", "red", "blue", "a", "big", "of"]) for _ in range(rng.randint(1, 7)))
             for _ in range(30)]
    weights = {w: rng.random() for w in ["cat", "dog", "red", "blue", "big", "cap", "zig", "hot", "cold", "[UNK]"]}

    def value(text, row):  # a score that depends on the text and on its row
        return sum(weights.get(w, 0.0) * (1 + (row + i) % 3) for i, w in enumerate(split_words(text)))

    def proposals(words, i):
        return ["cap", "zig", "hot", "cold"][: 1 + len(words[i]) % 4]

    for budget in (1, 2, 3):
        one_by_one = [greedy_substitution(t, lambda ts, row=row: torch.tensor([value(x, row) for x in ts]),
                                          proposals, budget) for row, t in enumerate(texts)]
        calls = []

        def score(ts, rows):
            calls.append(len(ts))
            return torch.tensor([value(x, r) for x, r in zip(ts, rows)])

        batched = greedy_substitutions(texts, score, lambda row, words, i: proposals(words, i), budget)
        assert batched == one_by_one
        assert len(calls) <= 1 + max(len(split_words(t)) for t in texts)  # one call per round


def test_objective_scores_fall_back_to_one_row_at_a_time(tiny_victim):
    from vlbench.evaluation.words import objective_scores

    class RowOnly:
        def __init__(self, inner):
            self.inner, self.texts = inner, inner.texts

        def score(self, candidates, row):
            return self.inner.score(candidates, row)

    objective = EmbeddingShiftObjective(tiny_victim, PROMPTS, tiny_victim.encode_texts(PROMPTS))
    candidates, rows = ["a red square.", "a blue circle.", "a green star."], [2, 0, 2]
    assert torch.allclose(objective_scores(RowOnly(objective))(candidates, rows), objective.score_many(candidates, rows))
