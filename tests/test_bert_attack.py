"""BERT-Attack's candidate generation on a hand-built masked LM whose logits are known."""

import pytest
import torch

from attacks._mlm import MaskedLM, load_masked_lm
from vlbench import api
from vlbench.errors import UserError
from vlbench.evaluation.objectives import EmbeddingShiftObjective
from vlbench.evaluation.words import changed_words

from tiny_bert import write_tiny_bert

# Every position predicts the same logits: the output bias. Hand-checked expectations follow.
BIAS = {"run": 3.0, "##ing": 2.4, "walk": 1.9, "##ed": 1.2, "blue": 0.5, "green": 0.4,
        "square": 0.2, "red": 0.1, "a": -1.0, "the": -1.0, "dog": -1.0}


@pytest.fixture(scope="module")
def hand_mlm():
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(BIAS)
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    model = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1,
                                       num_attention_heads=1, intermediate_size=16))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        bias = torch.full((len(vocab),), -5.0)
        for token, value in BIAS.items():
            bias[vocab.index(token)] = value
        model.cls.predictions.decoder.bias.copy_(bias)
    return MaskedLM(tokenizer, model, "hand")


def attack_with(mlm, **params):
    attack = api.build("attacks", "bert-attack", params)
    attack._mlm = mlm
    return attack


def test_single_piece_candidates_stop_at_the_threshold(hand_mlm):
    options = attack_with(hand_mlm).substitutes(["a", "red", "dog"])
    # top-10 by logit: run, ##ing, walk, ##ed, blue, green, square(0.2 < 0.3: stop)
    assert options[1] == ["run", "walk", "blue", "green"]


def test_multi_piece_word_ranked_by_perplexity(hand_mlm):
    options = attack_with(hand_mlm).substitutes(["the", "walking", "dog"])
    # "walking" = walk + ##ing; combinations of the top-4 pieces {run, ##ing, walk, ##ed}, ranked
    # by perplexity (= by summed logit here); phrases and "##" fragments are dropped.
    assert options[1] == ["runing", "walking", "runed", "walked"]


def test_top_k_limits_candidates(hand_mlm):
    assert attack_with(hand_mlm, top_k=3).substitutes(["red"])[0] == ["run", "walk"]


def test_attack_respects_budget_and_raises_objective(hand_mlm, tiny_victim):
    texts = ["a red dog", "the walking dog"]
    objective = EmbeddingShiftObjective(tiny_victim, texts, tiny_victim.encode_texts(texts))
    for budget in (0, 1, 2):
        attack = attack_with(hand_mlm, budget=budget)
        adversarial = attack.perturb_texts(tiny_victim, objective, torch.Generator().manual_seed(0))
        assert all(changed_words(a, b) <= budget for a, b in zip(texts, adversarial))
        if budget == 0:
            assert adversarial == texts
        else:
            assert all(objective.score([a], r) >= objective.score([t], r) for r, (t, a) in enumerate(zip(texts, adversarial)))
            assert any(changed_words(a, b) > 0 for a, b in zip(texts, adversarial))


def test_missing_real_mlm_names_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="not available offline.*huggingface-cli download bert-base-uncased"):
        load_masked_lm("bert-base-uncased")


class OneAtATime:
    """The same objective, but every candidate goes through the text encoder alone."""

    def __init__(self, objective):
        self.objective, self.texts = objective, objective.texts

    def score(self, candidates, row):
        return torch.cat([self.objective.score([c], row) for c in candidates])


@pytest.mark.benchmark(group="bert-attack")
def test_batched_candidates_against_one_at_a_time(benchmark, hand_mlm, tiny_victim):
    import time

    texts = ["a red dog walking", "the blue dog", "a green walking dog", "the red square"] * 3
    objective = EmbeddingShiftObjective(tiny_victim, texts, tiny_victim.encode_texts(texts))
    attack = attack_with(hand_mlm, budget=2)
    start = time.perf_counter()
    looped = attack.perturb_texts(tiny_victim, OneAtATime(objective), torch.Generator().manual_seed(0))
    one_at_a_time = time.perf_counter() - start
    batched = benchmark.pedantic(attack.perturb_texts, args=(tiny_victim, objective, torch.Generator().manual_seed(0)),
                                 rounds=3, iterations=1)
    assert batched == looped
    ratio = one_at_a_time / benchmark.stats.stats.min
    benchmark.extra_info["one_at_a_time_over_batched"] = round(ratio, 2)
    assert ratio > 1.0, f"batching candidates is not faster ({ratio:.2f}x)"


@pytest.mark.parametrize("safe", [True, False])
def test_a_local_mlm_loads_from_safetensors_only(tmp_path, safe):
    """A folder holding only a pickled ``pytorch_model.bin`` is refused: unpickling runs code."""
    write_tiny_bert(tmp_path, ["a", "red", "cube"], safe=safe)
    if safe:
        mlm = load_masked_lm(str(tmp_path))
        ids, _ = mlm.word_pieces(["a", "red", "cube"])
        values, indices = mlm.top_k(ids, 2)
        assert values.shape == indices.shape == (len(ids), 2)
    else:
        with pytest.raises(UserError, match="not available offline"):
            load_masked_lm(str(tmp_path))


def test_the_cached_world_mlm_is_read_once_per_process(monkeypatch):
    import attacks._mlm as mlm

    load_masked_lm("world")  # trained or found in the cache
    monkeypatch.setattr(mlm, "_loaded", {})
    reads = []
    real = mlm._load_folder
    monkeypatch.setattr(mlm, "_load_folder", lambda *args: reads.append(args) or real(*args))
    first = load_masked_lm("world")
    assert load_masked_lm("world") is first and len(reads) == 1
