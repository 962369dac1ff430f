"""Multimodal attacks: image stage inside its budget and the box, eps=0 leaves images alone,
text stage within its word budget, deterministic, and no better than clean."""

import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from vlbench import api
from vlbench.data.datasets import DatasetSpec, EvalData, get_spec, loader_for
from vlbench.evaluation.context import EvalContext
from vlbench.evaluation.objectives import MultimodalProblem
from vlbench.evaluation.tasks import evaluate
from vlbench.store.embeddings import EmbeddingCache

TEXT = {"text_attack": "deepwordbug", "text_params": {"budget": 1}}
RETRIEVAL = {"co-attack": {"eps": 8, "step_size": 2}, "sga": {"eps": 8, "step_size": 2, "steps": 4}}
CAPTIONS = [[f"a {c} {s} in the {p}", f"the {s} is {c}"]
            for c, s, p in [("red", "circle", "top left"), ("blue", "square", "middle"), ("green", "star", "bottom"),
                            ("pink", "heart", "top right"), ("cyan", "ring", "middle"), ("yellow", "cross", "top")]]


@pytest.fixture(scope="module")
def retrieval_data():
    torch.manual_seed(2)
    images = torch.rand(6, 3, 32, 32)
    return EvalData(DatasetSpec("toy-retrieval", "retrieval", "toy"), TensorDataset(images, torch.arange(6)),
                    None, None, CAPTIONS)


@pytest.fixture(scope="module")
def classification_data(tiny_victim):
    from vlbench.evaluation.context import classifier_weights

    torch.manual_seed(3)
    images = torch.rand(12, 3, 32, 32)
    classes, templates = ["red", "green", "blue", "pink"], ["a photo of a {c} thing.", "something {c}."]
    with torch.no_grad():  # label by clean prediction so that every image starts correct
        labels = (tiny_victim.encode_image(images) @ classifier_weights(tiny_victim, classes, templates).T).argmax(1)
    return EvalData(DatasetSpec("toy-classes", "classification", "toy"), TensorDataset(images, labels),
                    classes, templates, None)


def ctx(victim, tmp_path):
    return EvalContext(victim, EmbeddingCache(tmp_path), batch_size=4, progress=False)


def build(name, **params):
    return api.build("attacks", name, {**TEXT, **params})


@pytest.fixture(scope="module")
def world_retrieval():
    """12 test scenes of the world's retrieval task, 5 captions each."""
    spec = dataclasses.replace(get_spec("world-retrieval"), options={"n": 12})
    loaded = loader_for(spec)(spec, None, None)
    return EvalData(spec, loaded.images, None, None, loaded.captions)


@pytest.mark.parametrize("name", list(RETRIEVAL))
def test_retrieval_attack_lowers_recall_and_is_deterministic(world_victim, world_retrieval, tmp_path, name):
    # a trained victim: on a random one, recall sits at chance and an attack can raise it
    attack = build(name, **RETRIEVAL[name])
    first = evaluate(ctx(world_victim, tmp_path), world_retrieval, list(range(12)), attack, torch.Generator().manual_seed(0))
    again = evaluate(ctx(world_victim, tmp_path), world_retrieval, list(range(12)), attack, torch.Generator().manual_seed(0))
    assert first == again
    assert first["max_words_changed"] <= 1
    for key in ("i2t_R@1", "t2i_R@1"):
        assert first[key] < first[f"clean_{key}"]


def test_mmcoa_attack_on_classification(tiny_victim, classification_data, tmp_path):
    attack = build("mmcoa-attack", image_params={"eps": 16, "steps": 5, "step_size": 4})
    metrics = evaluate(ctx(tiny_victim, tmp_path), classification_data, list(range(12)), attack,
                       torch.Generator().manual_seed(0))
    assert metrics["top1"] < metrics["clean_top1"]
    assert metrics["max_words_changed"] <= 1
    assert [c["name"] for c in attack.config()["components"]] == ["pgd", "deepwordbug"]


def retrieval_problem(victim, images):
    texts = [c for caps in CAPTIONS for c in caps]
    rows = torch.arange(6).repeat_interleave(2)
    return MultimodalProblem("retrieval", victim, texts, victim.encode_texts(texts),
                             victim.encode_image(images).detach(), text_rows=rows)


@pytest.mark.parametrize("name", list(RETRIEVAL))
@pytest.mark.parametrize("eps", [0, 2, 8])
def test_image_stage_budget_and_box(tiny_victim, retrieval_data, name, eps):
    images = torch.stack([retrieval_data.images[i][0] for i in range(6)])
    problem = retrieval_problem(tiny_victim, images)
    attack = build(name, **{**RETRIEVAL[name], "eps": eps})
    adversarial = attack.attack_images(problem, torch.arange(6), images, problem.clean_text_embeddings,
                                       torch.Generator().manual_seed(0))
    if eps == 0:
        assert torch.equal(adversarial, images)
    assert (adversarial - images).abs().max() <= eps / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_multimodal_attacks_skip_the_other_task():
    assert "classification" in build("co-attack").skip_reason("classification")
    assert "retrieval" in build("mmcoa-attack").skip_reason("retrieval")
    assert build("sga").skip_reason("retrieval") is None


def test_component_of_wrong_modality_is_a_user_error():
    from vlbench.errors import UserError

    with pytest.raises(UserError, match="needs a text attack"):
        api.build("attacks", "sga", {"text_attack": "pgd"})


def test_attack_success_rates_use_both_definitions():
    from vlbench.evaluation.metrics import attack_success_rates

    clean = {"i2t_R@1": torch.tensor([True, True, True, True, False])}
    attacked = {"i2t_R@1": torch.tensor([True, False, False, False, True])}
    rates = attack_success_rates(clean, attacked)
    # Co-Attack: 80% -> 40% is a 40-point drop; SGA: 3 of the 4 clean-correct queries broke.
    assert rates["asr_drop_i2t_R@1"] == pytest.approx(40.0)
    assert rates["asr_relative_i2t_R@1"] == pytest.approx(75.0)
