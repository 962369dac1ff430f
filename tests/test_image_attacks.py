"""What every image attack promises: inside its budget, pixels in [0,1], eps=0 is the
identity, the same seed gives the same output, and it beats no attack."""

import pytest
import torch

from vlbench import api
from vlbench.evaluation import perturb
from vlbench.evaluation.context import classifier_weights
from vlbench.evaluation.objectives import ClassificationObjective, RetrievalObjective

CLASSES = ["red", "green", "blue", "round", "square", "big", "small", "tiny", "huge", "odd"]
FAST = {"pgd": {"steps": 5}, "cw": {"steps": 5}, "apgd-ce": {"iterations": 10},
        "apgd-t": {"iterations": 5, "n_target_classes": 3}, "autoattack": {"iterations": 5, "n_target_classes": 2},
        "square": {"queries": 100}, "fab-t": {"iterations": 5, "n_target_classes": 2}}


@pytest.fixture(scope="module")
def setup(tiny_victim):
    torch.manual_seed(1)
    images = torch.rand(24, 3, 32, 32)
    weights = classifier_weights(tiny_victim, CLASSES, ["a {c} thing."])
    with torch.no_grad():  # label every image with its clean prediction: all start correct
        labels = (tiny_victim.encode_image(images) @ weights.T).argmax(dim=1)
    noise = perturb.SampleNoise(0, torch.arange(len(images)))  # as the evaluator keys samples
    return tiny_victim, images, ClassificationObjective(tiny_victim, weights, labels, noise)


def build(name, **params):
    return api.build("attacks", name, {**FAST[name], **params})


def run(attack, setup, seed=0):
    victim, images, objective = setup
    return attack.perturb_images(victim, images, objective, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("eps", [2, 8])
def test_within_linf_budget_and_box(setup, name, eps):
    _, images, _ = setup
    adversarial = run(build(name, eps=eps), setup)
    assert (adversarial - images).abs().max() <= eps / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "fab-t"])
def test_within_l2_budget(setup, name):
    _, images, _ = setup
    params = {"eps": 0.5, "norm": "L2"} | ({"step_size": 0.1} if name == "pgd" else {})
    adversarial = run(build(name, **params), setup)
    assert perturb.perturbation_norm(adversarial - images, "L2").max() <= 0.5 + 1e-5
    assert adversarial.min() >= 0 and adversarial.max() <= 1


@pytest.mark.parametrize("name", list(FAST))
def test_eps_zero_changes_nothing(setup, name):
    _, images, _ = setup
    assert torch.equal(run(build(name, eps=0), setup), images)


@pytest.mark.parametrize("name", list(FAST))
def test_same_seed_same_output(setup, name):
    attack = build(name, eps=8)
    assert torch.equal(run(attack, setup, seed=3), run(attack, setup, seed=3))


@pytest.mark.parametrize("name", list(FAST))
def test_lowers_accuracy_and_raises_the_loss(setup, name):
    victim, images, objective = setup
    step = {"step_size": 4} if name in ("pgd", "cw") else {}
    adversarial = run(build(name, eps=16, **step), setup)
    with torch.no_grad():
        if name == "square":  # black-box: on this random model 100 queries shrink margins, not flip them
            true = objective.logits(adversarial).gather(1, objective.labels[:, None])
            clean = objective.logits(images).gather(1, objective.labels[:, None])
            assert (true - clean).mean() < 0
            return
        assert objective.correct(adversarial).float().mean() < objective.correct(images).float().mean()
        if name in ("pgd", "apgd-ce"):
            assert objective.loss(adversarial).mean() > objective.loss(images).mean()


def test_apgd_is_at_least_as_strong_as_pgd_at_equal_budget(setup):
    _, _, objective = setup
    pgd = objective.correct(run(build("pgd", eps=4, steps=10), setup).detach()).sum()
    apgd = objective.correct(run(build("apgd-ce", eps=4, iterations=10), setup)).sum()
    assert apgd <= pgd


def test_autoattack_is_the_pointwise_worst_case(setup):
    _, _, objective = setup
    parts = [objective.correct(run(build(n, eps=12), setup)) for n in ("apgd-ce", "apgd-t")]
    combined = objective.correct(run(build("autoattack", eps=12), setup))
    # per sample, not only in total: a component inside AutoAttack, run on the samples the
    # earlier ones left, starts each sample where it starts when run alone
    assert not (combined & ~(parts[0] & parts[1])).any()
    assert 0 < combined.sum() < parts[0].sum()


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "apgd-t", "fab-t"])
def test_a_sample_is_attacked_alike_in_any_subset(setup, name):
    victim, images, objective = setup
    attack = build(name, eps=4, **({"restarts": 2} if name != "apgd-t" else {}))
    whole = run(attack, setup)
    rows = torch.tensor([3, 7, 8, 20])
    alone = attack.perturb_images(victim, images[rows], objective.subset(rows), torch.Generator().manual_seed(9))
    assert torch.allclose(alone, whole[rows], atol=1e-5)


def test_sample_noise_depends_on_seed_key_and_stream_only():
    noise = perturb.SampleNoise(3, torch.tensor([10, 11, 12]))
    draws = noise.uniform((2, 2), stream=1)
    assert torch.equal(noise.subset(torch.tensor([2, 0])).uniform((2, 2), stream=1), draws[[2, 0]])
    assert torch.equal(perturb.SampleNoise(3, torch.tensor([12])).uniform((2, 2), stream=1), draws[2:])
    assert not torch.equal(noise.uniform((2, 2), stream=2), draws)
    assert not torch.equal(perturb.SampleNoise(4, noise.keys).uniform((2, 2), stream=1), draws)


def test_autoattack_result_names_its_components():
    config = build("autoattack", eps=4).config()
    assert [c["name"] for c in config["components"]] == ["apgd-ce", "apgd-t"]
    assert config["components"][1]["params"]["n_target_classes"] == 2


def test_autoattack_standard_runs_all_four_components(setup):
    victim, images, objective = setup
    attack = build("autoattack", eps=12, version="standard", square_queries=50)
    config = attack.config()
    assert [c["name"] for c in config["components"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    fab = config["components"][2]["params"]
    assert (fab["iterations"], fab["n_target_classes"], fab["restarts"]) == (5, 2, 1)
    assert config["components"][3]["params"]["queries"] == 50
    ran = []
    for component in attack.components:
        component.perturb_images = lambda *args, _run=component.perturb_images, _name=component.name: (
            ran.append(_name), _run(*args))[1]
    subset = torch.arange(8)
    adversarial = attack.perturb_images(victim, images[subset], objective.subset(subset),
                                        torch.Generator().manual_seed(0))
    assert ran == ["apgd-ce", "apgd-t", "fab-t", "square"]  # at 12/255 some samples survive each
    assert (adversarial - images[subset]).abs().max() <= 12 / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        assert objective.subset(subset).correct(adversarial).sum() < len(subset)


def test_fab_projection_is_the_closest_point_of_hyperplane_and_box():
    from importlib import import_module

    from scipy.optimize import linprog

    project = import_module(api.attacks.get("fab-t").__module__).project_onto_hyperplane_in_box
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(20, 6, generator=generator, dtype=torch.float64)
    w = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    w[::4, :2] = 0
    c = (w * points).sum(dim=1) + 0.8 * torch.randn(20, generator=generator, dtype=torch.float64)
    for norm in ("Linf", "L2"):
        moved = points + project(points, w, c, norm)
        assert moved.min() >= 0 and moved.max() <= 1
        for i in range(20):
            p, wi, ci = points[i].numpy(), w[i].numpy(), c[i].item()
            bounds = [(-v, 1 - v) for v in p]
            if linprog([0] * 6, A_eq=[wi], b_eq=[ci - wi @ p], bounds=bounds).status != 0:
                continue  # the box cannot reach the hyperplane
            assert (w[i] * moved[i]).sum().item() == pytest.approx(ci, abs=1e-9)
            if norm == "Linf":  # min t subject to |d_j| <= t, <w, d> = c - <w, p>, p + d in the box
                rows = [[*row, -1] for row in [*torch.eye(6).tolist(), *(-torch.eye(6)).tolist()]]
                best = linprog([0] * 6 + [1], A_ub=rows, b_ub=[0] * 12, A_eq=[[*wi, 0]], b_eq=[ci - wi @ p],
                               bounds=bounds + [(0, None)]).fun
                assert (moved[i] - points[i]).abs().max().item() == pytest.approx(best, abs=1e-7)
            else:  # KKT: d = clip(λ·w) to the box for a single λ certifies the minimum
                d = moved[i] - points[i]
                free = (w[i] != 0) & (moved[i] > 1e-12) & (moved[i] < 1 - 1e-12)
                if free.any():
                    lam = (d[free] / w[i][free]).mean()
                    assert torch.allclose(torch.clamp(lam * w[i], -points[i], 1 - points[i]), d, atol=1e-9)


def test_fab_t_caps_targets_below_ten_classes(tiny_victim):
    images = torch.rand(8, 3, 32, 32)
    weights = classifier_weights(tiny_victim, CLASSES[:3], ["a {c} thing."])
    with torch.no_grad():
        labels = (tiny_victim.encode_image(images) @ weights.T).argmax(dim=1)
    objective = ClassificationObjective(tiny_victim, weights, labels)
    attack = api.build("attacks", "fab-t", {"eps": 8, "iterations": 3})
    adversarial = attack.perturb_images(tiny_victim, images, objective, torch.Generator().manual_seed(0))
    assert (adversarial - images).abs().max() <= 8 / 255 + 1e-6
    assert any("only 2 target classes (asked for 9)" in n for n in attack.take_adjustments())
    assert attack.take_notes() == []


def test_fab_t_restarts_are_seeded(setup):
    attack = build("fab-t", eps=4, iterations=3, restarts=2)
    assert torch.equal(run(attack, setup, seed=5), run(attack, setup, seed=5))


def test_apgd_t_falls_back_below_four_classes(tiny_victim):
    images = torch.rand(8, 3, 32, 32)
    weights = classifier_weights(tiny_victim, CLASSES[:3], ["a {c} thing."])
    objective = ClassificationObjective(tiny_victim, weights, torch.zeros(8, dtype=torch.long))
    attack = build("apgd-t", eps=8)
    attack.perturb_images(tiny_victim, images, objective, torch.Generator().manual_seed(0))
    notes = attack.take_adjustments()
    assert any("targeted cross-entropy" in n for n in notes) and any("only 2 target" in n for n in notes)


def test_pgd_restarts_only_help(setup):
    _, _, objective = setup
    one = objective.correct(run(build("pgd", eps=4, restarts=1), setup)).sum()
    three = objective.correct(run(build("pgd", eps=4, restarts=3), setup)).sum()
    assert three <= one


def test_retrieval_objective_pgd(tiny_victim):
    images = torch.rand(6, 3, 32, 32)
    texts = tiny_victim.encode_texts([f"caption {i} {j}" for i in range(6) for j in range(2)])
    owner = torch.arange(6).repeat_interleave(2)
    objective = RetrievalObjective(tiny_victim, texts, owner[None, :] == torch.arange(6)[:, None])
    adversarial = api.build("attacks", "pgd", {"eps": 8, "steps": 5}).perturb_images(
        tiny_victim, images, objective, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert objective.loss(adversarial).mean() > objective.loss(images).mean()


def test_margin_losses_against_their_formulas():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    y, t = torch.tensor([0]), torch.tensor([4])
    assert perturb.cw_margin(logits, y, kappa=50).item() == pytest.approx(-(3.0 - 2.0))
    # already wrong by more than κ: the margin is capped at -κ, so the loss stops growing
    assert perturb.cw_margin(logits, torch.tensor([4]), kappa=0.5).item() == pytest.approx(0.5)
    assert perturb.cw_margin(logits, torch.tensor([4]), kappa=50).item() == pytest.approx(4.0)
    assert perturb.dlr(logits, y).item() == pytest.approx(-(3.0 - 2.0) / (3.0 - 1.0))
    assert perturb.targeted_dlr(logits, y, t).item() == pytest.approx(-(3.0 + 1.0) / (3.0 - (1.0 + 0.0) / 2))


def test_square_schedule_follows_the_reference():
    from importlib import import_module

    from vlbench import api as vlapi

    module = import_module(vlapi.attacks.get("square").__module__)
    assert module.area_fraction(0.8, 1, 10000) == pytest.approx(0.8)
    assert module.area_fraction(0.8, 11, 10000) == pytest.approx(0.4)
    assert module.area_fraction(0.8, 2500, 5000) == pytest.approx(0.8 / 128)
    assert module.area_fraction(0.8, 9000, 10000) == pytest.approx(0.8 / 512)


def test_flags_loss_that_never_increases(tiny_victim):
    class Flat:  # an objective with no gradient signal: the attack cannot make progress
        def loss(self, images, rows=None):
            return images.sum(dim=(1, 2, 3)) * 0.0

        def correct(self, images, rows=None):
            return torch.ones(len(images), dtype=torch.bool)

    attack = build("pgd", eps=4)
    attack.perturb_images(tiny_victim, torch.rand(4, 3, 32, 32), Flat(), torch.Generator().manual_seed(0))
    assert any("loss never increased" in note for note in attack.take_notes())


def test_flags_non_deterministic_attacks(tiny_victim, tmp_path):
    from torch.utils.data import TensorDataset

    from vlbench.data.datasets import DatasetSpec, EvalData
    from vlbench.evaluation.context import EvalContext
    from vlbench.evaluation.tasks import evaluate
    from vlbench.store.embeddings import EmbeddingCache

    @api.attacks.register("unseeded-test")
    class Unseeded(api.ImageAttack):
        version = "1"

        def perturb_images(self, victim, images, objective, generator):
            return (images + 0.01 * torch.rand(images.shape)).clamp(0, 1)  # ignores the generator

    try:
        data = EvalData(DatasetSpec("toy", "classification", "toy"),
                        TensorDataset(torch.rand(8, 3, 32, 32), torch.arange(8) % 2), ["a", "b"], ["{c}"], None)
        attack = api.build("attacks", "unseeded-test")
        evaluate(EvalContext(tiny_victim, EmbeddingCache(tmp_path), 8, False), data, list(range(8)), attack,
                 torch.Generator().manual_seed(0))
        assert any("non-deterministic" in note for note in attack.take_notes())
        seeded = build("pgd", eps=4)
        evaluate(EvalContext(tiny_victim, EmbeddingCache(tmp_path), 8, False), data, list(range(8)), seeded,
                 torch.Generator().manual_seed(0))
        assert not any("non-deterministic" in note for note in seeded.take_notes())
    finally:
        api.attacks.unregister("unseeded-test")


def test_pgd_leaves_misclassified_samples_alone_when_they_count_as_errors(setup):
    victim, images, objective = setup
    labels = objective.labels.clone()
    labels[::3] = (labels[::3] + 1) % len(CLASSES)  # every third sample is now misclassified
    noise = perturb.SampleNoise(0, torch.arange(len(images)))
    everything = ClassificationObjective(victim, objective.weights, labels, noise)
    only_correct = ClassificationObjective(victim, objective.weights, labels, noise, attack_only_correct=True)
    pgd = build("pgd", eps=8)
    all_attacked = pgd.perturb_images(victim, images, everything, torch.Generator().manual_seed(0))
    skipping = pgd.perturb_images(victim, images, only_correct, torch.Generator().manual_seed(0))
    wrong = ~only_correct.correct(images)
    assert wrong.any() and torch.equal(skipping[wrong], images[wrong])
    assert torch.allclose(skipping[~wrong], all_attacked[~wrong], atol=1e-6)
    assert any("only the samples classified correctly" in m for m in pgd.take_adjustments())
