"""Text attacks that keep the meaning: the world's synonyms and parser, the search's
constraint (rejected edits are never scored or chosen), the counts a cell records, and
BERT-Attack's sentence-encoder constraint on a local encoder."""

import dataclasses
import random

import pytest
import torch

from vlbench import api
from vlbench.data.datasets import EvalData, get_spec, loader_for
from vlbench.errors import UserError
from vlbench.evaluation.context import EvalContext
from vlbench.evaluation.objectives import EmbeddingShiftObjective, ImageGuidedTextObjective
from vlbench.evaluation.tasks import evaluate
from vlbench.evaluation.words import changed_words, greedy_substitutions, split_words
from vlbench.store.embeddings import EmbeddingCache
from vlbench.world.scenes import ATTRIBUTES, SYNONYMS, TEMPLATES, random_caption, sample_scenes, scene_from_caption

from tiny_bert import write_tiny_bert

PROMPTS = ["a photo of a red circle.", "a small blue square on a striped background.",
           "this is a photo of a green triangle", "a large yellow star in the top left"]


def attack_texts(name, victim, objective, seed=0, **params):
    attack = api.build("attacks", name, params)
    return attack, attack.perturb_texts(victim, objective, torch.Generator().manual_seed(seed))


# -- the world's words ----------------------------------------------------------------------
def test_every_synonym_is_read_as_its_class_and_belongs_to_one_value():
    values = {v for vs in ATTRIBUTES.values() for v in vs}
    words = [w for ws in SYNONYMS.values() for w in ws]
    assert len(words) == len(set(words)) and not set(words) & values
    for name, classes in ATTRIBUTES.items():
        for value in classes:
            for word in SYNONYMS.get(value, ()):
                for template in TEMPLATES[name]:
                    assert scene_from_caption(template.format(c=word)) == {name: value}, word


def test_pretraining_captions_use_synonyms_and_stay_true():
    rng = random.Random(0)
    synonyms = set().union(*SYNONYMS.values())
    used = 0
    for scene in sample_scenes("train", 400, seed=1):
        caption = random_caption(scene, rng)
        used += bool(set(split_words(caption)) & synonyms)
        assert all(scene.attributes()[k] == v for k, v in scene_from_caption(caption).items()), caption
    assert 40 < used < 300  # some captions say a value by a synonym, most by its class name


# -- the search's constraint ----------------------------------------------------------------
def test_rejected_candidates_are_never_scored_and_the_search_moves_on():
    # "cat" is the most important word, but every candidate for it is rejected: the search
    # goes on to "dog" in the same round, and no rejected text reaches the scorer (which
    # also rates the texts with a word masked, to rank the words)
    scored = []

    def score(texts, rows):
        scored.extend(texts)
        return torch.tensor([t.count("z") + 10.0 * ("cat" not in t) for t in texts])

    proposals = {"cat": ["cap", "zzz"], "dog": ["dig", "zoz"]}

    def accept(texts, rows):
        return ["cat" in t for t in texts]  # any edit of "cat" changes the meaning

    result = greedy_substitutions(["the cat and the dog"], score, lambda row, w, i: proposals.get(w[i], []), 1,
                                  accept=accept)
    assert result == ["the cat and the zoz"]
    assert not any(w in split_words(t) for t in scored for w in ("cap", "zzz"))
    unconstrained = greedy_substitutions(["the cat and the dog"], score, lambda row, w, i: proposals.get(w[i], []), 1)
    assert unconstrained == ["the zzz and the dog"]


@pytest.fixture(scope="module")
def meaning_objective(tiny_victim):
    return EmbeddingShiftObjective(tiny_victim, PROMPTS, tiny_victim.encode_texts(PROMPTS), meaning=scene_from_caption)


def test_meaning_constraint_keeps_what_every_text_states(tiny_victim, meaning_objective):
    free = EmbeddingShiftObjective(tiny_victim, PROMPTS, tiny_victim.encode_texts(PROMPTS))
    _, unconstrained = attack_texts("deepwordbug", tiny_victim, free, constraint="none", budget=2)
    attack, kept = attack_texts("deepwordbug", tiny_victim, meaning_objective, constraint="meaning", budget=2)
    # unconstrained, a typo in an attribute word changes what the text states
    assert any(scene_from_caption(a) != scene_from_caption(c) for a, c in zip(unconstrained, PROMPTS))
    assert all(scene_from_caption(a) == scene_from_caption(c) for a, c in zip(kept, PROMPTS))
    assert any(a != c for a, c in zip(kept, PROMPTS))  # filler words can still change
    assert all(changed_words(a, c) <= 2 for a, c in zip(kept, PROMPTS))
    counts = attack.take_counts()
    assert 0 < counts["edits_rejected"] < counts["edits_considered"]


def test_auto_keeps_the_meaning_where_the_dataset_has_a_parser(tiny_victim, meaning_objective):
    free = EmbeddingShiftObjective(tiny_victim, PROMPTS, tiny_victim.encode_texts(PROMPTS))
    assert attack_texts("deepwordbug", tiny_victim, meaning_objective)[1] == \
        attack_texts("deepwordbug", tiny_victim, meaning_objective, constraint="meaning")[1]
    auto, texts = attack_texts("deepwordbug", tiny_victim, free)
    assert texts == attack_texts("deepwordbug", tiny_victim, free, constraint="none")[1]
    assert auto.take_counts() == {}


def test_unconstrained_configuration_is_what_it_was_before_the_constraint():
    assert "constraint" not in api.build("attacks", "deepwordbug", {"constraint": "none"}).config()["params"]
    assert api.build("attacks", "bert-attack", {"constraint": "meaning"}).threat_model()["constraint"] == "meaning"


def test_meaning_on_a_dataset_without_a_parser_is_a_clear_error(tiny_victim):
    free = EmbeddingShiftObjective(tiny_victim, PROMPTS, tiny_victim.encode_texts(PROMPTS))
    with pytest.raises(UserError, match="no parser") as info:
        attack_texts("deepwordbug", tiny_victim, free, constraint="meaning")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("params, match", [({"constraint": "meanng"}, "constraint 'meanng'"),
                                           ({"constraint": "sentence-encoder"}, "no encoder"),
                                           ({"similarity": 2.0}, "similarity")])
def test_bad_constraint_parameters_are_refused(params, match):
    with pytest.raises(UserError, match=match):
        api.build("attacks", "bert-attack", params)


# -- what a cell records --------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_retrieval():
    spec = dataclasses.replace(get_spec("world-retrieval"), options={"n": 8})
    loaded = loader_for(spec)(spec, None, None)
    return EvalData(spec, loaded.images, None, None, loaded.captions, loaded.meaning)


@pytest.mark.parametrize("name, params", [("deepwordbug", {}),
                                          ("co-attack", {"text_attack": "deepwordbug", "eps": 4, "step_size": 1})])
def test_cells_count_the_edits_rejected_for_changing_the_meaning(world_victim, world_retrieval, tmp_path, name, params):
    ctx = EvalContext(world_victim, EmbeddingCache(tmp_path), batch_size=8, progress=False)
    metrics = evaluate(ctx, world_retrieval, list(range(8)), api.build("attacks", name, params),
                       torch.Generator().manual_seed(0))
    assert 0 < metrics["edits_rejected"] < metrics["edits_considered"]
    unconstrained = {**params, "text_params": {"constraint": "none"}} if "text_attack" in params else {"constraint": "none"}
    metrics = evaluate(ctx, world_retrieval, list(range(8)), api.build("attacks", name, unconstrained),
                       torch.Generator().manual_seed(0))
    assert "edits_rejected" not in metrics


def test_image_guided_captions_keep_their_meaning(world_victim, world_retrieval):
    texts = [c for caps in world_retrieval.captions for c in caps]
    images = torch.stack([world_retrieval.images[i][0] for i in range(8)])
    rows = torch.arange(8).repeat_interleave(len(world_retrieval.captions[0]))
    objective = ImageGuidedTextObjective(world_victim, texts, world_victim.encode_image(images)[rows],
                                         meaning=scene_from_caption)
    _, attacked = attack_texts("deepwordbug", world_victim, objective, budget=2)
    assert all(scene_from_caption(a) == scene_from_caption(c) for a, c in zip(attacked, texts))
    assert sum(a != c for a, c in zip(attacked, texts)) > len(texts) // 2


# -- BERT-Attack's own constraint -------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    words = sorted({w for p in PROMPTS for w in split_words(p)} | {"rde", "bleu", "greem"})
    return write_tiny_bert(tmp_path_factory.mktemp("encoder"), words, seed=1)


@pytest.mark.parametrize("similarity, unchanged", [(1.0, True), (-1.0, False)])
def test_sentence_encoder_threshold_decides(tiny_victim, encoder_folder, similarity, unchanged):
    free = EmbeddingShiftObjective(tiny_victim, PROMPTS, tiny_victim.encode_texts(PROMPTS))
    attack, texts = attack_texts("deepwordbug", tiny_victim, free, constraint="sentence-encoder",
                                 encoder=str(encoder_folder), similarity=similarity)
    counts = attack.take_counts()
    if unchanged:  # nothing reaches cosine 1 with the original: every edit rejected
        assert texts == PROMPTS and counts["edits_rejected"] == counts["edits_considered"] > 0
    else:  # every edit passes: the unconstrained search
        assert texts == attack_texts("deepwordbug", tiny_victim, free, constraint="none")[1]
        assert counts["edits_rejected"] == 0


def test_sentence_encoder_similarity_is_the_cosine_of_mean_pooled_states(encoder_folder):
    from attacks._constraints import load_sentence_encoder

    encoder = load_sentence_encoder(str(encoder_folder))
    a, b = encoder.embed(["a red circle", "a bleu square on a striped background"])
    assert torch.allclose(a.norm(), torch.tensor(1.0)) and torch.allclose(b.norm(), torch.tensor(1.0))
    assert torch.allclose(encoder.similarity(["a red circle"], ["a bleu square on a striped background"]), a @ b)
    assert torch.allclose(encoder.similarity(["a red circle"], ["a red circle"]), torch.tensor(1.0))


def test_missing_or_pickled_encoder_says_what_to_put_where(tmp_path):
    missing = api.build("attacks", "bert-attack", {"constraint": "sentence-encoder", "encoder": str(tmp_path / "none")})
    with pytest.raises(UserError, match="not found") as info:
        missing.prepare()
    assert str(tmp_path / "none") in str(info.value) and "\n" not in str(info.value)
    pickled = write_tiny_bert(tmp_path / "pickled", ["a", "red"], safe=False)
    attack = api.build("attacks", "deepwordbug", {"constraint": "sentence-encoder", "encoder": str(pickled)})
    with pytest.raises(UserError, match="safetensors"):
        attack.prepare()
