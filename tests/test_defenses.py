"""Defenses: each loss against a direct computation of its paper's formula; gradients reach
exactly the parameters the paper trains; FARE's reference encoder stays frozen."""

import copy
import importlib

import pytest
import torch

from vlbench import api
from vlbench.evaluation.context import classifier_weights
from vlbench.training import losses
from vlbench.training.batches import TrainingBatch
from vlbench.training.loop import TrainingRun

torch.manual_seed(0)
B, D, C = 6, 8, 4
IMAGES, TEXTS = torch.randn(B, D), torch.randn(B, D)
CLASSES, LABELS = torch.randn(C, D), torch.randint(0, C, (B,))


def cos(a, b):
    return (a @ b) / (a.norm() * b.norm())


def test_class_prompt_loss_is_tecoa_formula():
    expected = 0.0
    for i in range(B):
        logits = torch.stack([100 * cos(IMAGES[i], CLASSES[c]) for c in range(C)])
        expected += -torch.log_softmax(logits, 0)[LABELS[i]]
    assert losses.class_prompt_loss(IMAGES, CLASSES, LABELS, 100.0).item() == pytest.approx(expected.item() / B, rel=1e-5)


def symmetric_clip(images, texts, scale):
    s = torch.stack([torch.stack([scale * cos(images[j], texts[k]) for k in range(B)]) for j in range(B)])
    image_to_text = -sum(torch.log_softmax(s[j], 0)[j] for j in range(B)) / B
    text_to_image = -sum(torch.log_softmax(s[:, k], 0)[k] for k in range(B)) / B
    return image_to_text + text_to_image


def test_clip_loss_is_the_symmetric_in_batch_loss():
    assert losses.clip_loss(IMAGES, TEXTS, 50.0).item() == pytest.approx(symmetric_clip(IMAGES, TEXTS, 50.0).item(), rel=1e-5)


def test_fare_distance_is_squared_l2_summed_then_averaged():
    expected = sum(((IMAGES[i] - TEXTS[i]) ** 2).sum() for i in range(B)) / B
    from defenses.fare import embedding_distance

    assert embedding_distance(IMAGES, TEXTS).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mmcoa_loss_is_half_clean_vs_adversarial_text_half_adversarial_image_vs_text():
    module = importlib.import_module(api.defenses.get("mmcoa").__module__)
    adv_images, adv_texts = IMAGES + 0.1 * torch.randn(B, D), TEXTS + 0.1 * torch.randn(B, D)
    expected = 0.5 * symmetric_clip(IMAGES, adv_texts, 30.0) + 0.5 * symmetric_clip(adv_images, TEXTS, 30.0)
    assert module.mmcoa_loss(IMAGES, adv_texts, adv_images, TEXTS, 30.0).item() == pytest.approx(expected.item(), rel=1e-5)


# -- training on the tiny CLIP ---------------------------------------------------------------
class ToyData:
    classnames = ["red", "green", "blue", "pink"]


class ToyBatches:
    """Stands in for the card's training splits: seeded random images of four classes, or
    (``captions``) of image-caption pairs."""

    def __init__(self, victim, captions=False):
        self.generator = torch.Generator().manual_seed(0)
        self.captions = captions
        with torch.no_grad():
            self.weights = classifier_weights(victim, ToyData.classnames, ["a {c} thing."])

    def batch(self, step):
        images = torch.rand(8, 3, 32, 32, generator=self.generator)
        labels = torch.randint(0, 4, (8,), generator=self.generator)
        if self.captions:
            return TrainingBatch(images, captions=[f"a {ToyData.classnames[y]} blob number {i}"
                                                   for i, y in enumerate(labels.tolist())])
        return TrainingBatch(images, labels, self.weights, ToyData.classnames)


TRAINS_VISUAL_ONLY = ["vanilla", "tecoa", "fare"]
SMALL = {"steps": 2, "warmup": 0, "lr": 1e-3, "optimizer": "adamw"}


def fit(name, tiny_victim, monkeypatch, captions=False, **params):
    victim = copy.deepcopy(tiny_victim)
    defense = api.build("defenses", name, {**SMALL, **params})
    monkeypatch.setattr(type(defense), "batches", lambda self, v, *_, **__: ToyBatches(v, captions))
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}
    defense.fit(victim, TrainingRun(progress=False))
    changed = {k for k, v in victim.model.state_dict().items() if not torch.equal(v, before[k])}
    with_grad = {n for n, p in victim.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return defense, changed, with_grad


@pytest.mark.parametrize("name", TRAINS_VISUAL_ONLY)
def test_image_encoder_defenses_train_only_the_image_encoder(name, tiny_victim, monkeypatch):
    _, changed, with_grad = fit(name, tiny_victim, monkeypatch)
    assert changed and all(k.startswith("visual.") for k in changed)
    assert with_grad and all(n.startswith("visual.") for n in with_grad)


def test_mmcoa_trains_both_encoders_and_the_logit_scale(tiny_victim, monkeypatch):
    _, changed, with_grad = fit("mmcoa", tiny_victim, monkeypatch, text_attack="deepwordbug",
                                text_params={"budget": 1}, attack_steps=2)
    assert "logit_scale" in changed and "logit_scale" in with_grad
    assert any(k.startswith("visual.") for k in changed)
    assert any(k.startswith("transformer.") or k.startswith("token_embedding") for k in changed)


def test_mmcoa_on_caption_pairs_attacks_the_captions(tiny_victim, monkeypatch):
    attacked = []
    original = api.attacks.get("deepwordbug").perturb_texts
    monkeypatch.setattr(api.attacks.get("deepwordbug"), "perturb_texts",
                        lambda self, victim, objective, generator: (attacked.append(list(objective.texts)),
                                                                    original(self, victim, objective, generator))[1])
    _, changed, _ = fit("mmcoa", tiny_victim, monkeypatch, captions=True, text_attack="deepwordbug",
                        text_params={"budget": 1}, attack_steps=2)
    assert len(attacked) == 2 and all(len(texts) == 8 and "blob number" in texts[0] for texts in attacked)
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("transformer.") for k in changed)


def test_training_batches_pair_retrieval_images_with_their_captions(tiny_victim):
    from vlbench.errors import UserError
    from vlbench.training.batches import TrainingBatches

    batches = TrainingBatches(tiny_victim, ["world-shape", "world-retrieval"], "test", 4, 0,
                              tasks=("classification", "retrieval"))
    shapes, pairs = batches.batch(0), batches.batch(1)
    assert shapes.captions is None and shapes.labels.shape == (4,) and shapes.class_weights is not None
    assert pairs.labels is None and len(pairs.captions) == 4 and pairs.images.shape[0] == 4
    with pytest.raises(UserError, match="needs classification data, it is retrieval"):
        TrainingBatches(tiny_victim, ["world-retrieval"], "test", 4, 0)


def test_fare_reference_encoder_stays_frozen(tiny_victim, monkeypatch):
    original = {k: v.clone() for k, v in tiny_victim.model.visual.state_dict().items()}
    defense, changed, _ = fit("fare", tiny_victim, monkeypatch)
    assert changed
    assert all(torch.equal(original[k], v) for k, v in defense.reference.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in defense.reference.parameters())


def test_defense_parameters_are_checked():
    from vlbench.errors import UserError

    with pytest.raises(UserError, match="optimizer 'rmsprop' is unknown"):
        api.build("defenses", "tecoa", {"optimizer": "rmsprop"})
    with pytest.raises(UserError, match="eps=300.0/255 is out of range"):
        api.build("defenses", "fare", {"eps": 300})
    assert api.build("defenses", "fare").params.eps == 2.0
    assert api.build("defenses", "tecoa").params.attack_steps == 2
