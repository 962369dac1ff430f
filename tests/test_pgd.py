"""PGD's promises: inside the budget, pixels in [0,1], eps=0 is the identity, seeded, and
stronger than no attack."""

import pytest
import torch

from vlbench import api
from vlbench.tasks import ClassificationObjective, classifier_weights


@pytest.fixture(scope="module")
def setup(tiny_victim):
    torch.manual_seed(1)
    images = torch.rand(16, 3, 32, 32)
    weights = classifier_weights(tiny_victim, ["red", "green", "blue", "round", "square"], ["a {c} thing."])
    labels = torch.randint(0, 5, (16,))
    return tiny_victim, images, ClassificationObjective(tiny_victim, weights, labels)


def attack(**params):
    return api.build("attacks", "pgd", params)


def run(pgd, setup, seed=0):
    victim, images, objective = setup
    return pgd.perturb_images(victim, images, objective, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("eps", [1, 4, 8])
def test_perturbation_within_budget_and_box(setup, eps):
    _, images, _ = setup
    adversarial = run(attack(eps=eps, steps=5, step_size=1), setup)
    assert (adversarial - images).abs().max() <= eps / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_eps_zero_changes_nothing(setup):
    _, images, _ = setup
    assert torch.equal(run(attack(eps=0, steps=5), setup), images)


def test_same_seed_same_result_other_seed_other_start(setup):
    pgd = attack(eps=4, steps=3)
    assert torch.equal(run(pgd, setup, seed=7), run(pgd, setup, seed=7))
    assert not torch.equal(run(pgd, setup, seed=7), run(pgd, setup, seed=8))


def test_raises_the_loss_over_clean_and_random_noise(setup):
    victim, images, objective = setup
    adversarial = run(attack(eps=8, steps=10, step_size=2), setup)
    noise = (images + (torch.rand_like(images) * 2 - 1) * 8 / 255).clamp(0, 1)
    with torch.no_grad():
        clean_loss = objective.loss(images).mean()
        noise_loss = objective.loss(noise).mean()
        adversarial_loss = objective.loss(adversarial).mean()
    assert adversarial_loss > clean_loss + 0.05
    assert adversarial_loss > noise_loss + 0.05


def test_threat_model_records_eps_in_pixels():
    assert attack(eps=4).threat_model() == {"modality": "image", "norm": "Linf", "eps": 4 / 255, "eps_255": 4}
