"""`vlbench validate`: a plugin's declaration, and on the world what it promises; one line
per check, exit status 2 on any failure."""

from __future__ import annotations

import textwrap

import pytest

from vlbench import api
from vlbench.cli import main

HEADER = """
from dataclasses import dataclass, field
import torch
from vlbench.api import ImageAttack, attacks, defenses
from vlbench.training.defenses import TrainingDefense
from vlbench.evaluation.perturb import NormBallAttack
"""


def image_attack(name: str, docstring: str, body: str) -> str:
    """The source of a fully declared L∞ attack whose ``perturb_images`` runs ``body``."""
    return f'''
@attacks.register("{name}")
class Attack(NormBallAttack):
    """{docstring}"""
    paper = "a test's"
    description = "{docstring}"
    version = "1"

    @dataclass
    class Params:
        eps: float = 4.0
        norm: str = "Linf"

    def perturb_images(self, victim, images, objective, generator):
        {body}
'''


#: an honest L∞ attack (FGSM): one signed-gradient step, then into the ball and the box
GOOD_ATTACK = image_attack("step-once", "one step of the loss's gradient sign, of size eps", """\
x = images.clone().requires_grad_(True)
        grad, = torch.autograd.grad(objective.loss(x).sum(), x)
        return (images + self.eps * grad.sign()).clamp(0, 1).detach()""")

#: breaks every promise an image attack makes, with a correct declaration
BAD_ATTACK = image_attack("reckless", "noise of twice its radius, from the global generator, pixels unclipped",
                          "return images + 2 * self.eps * torch.rand(images.shape) + 1e-3")

#: declares too little: no docstring, no version, a parameter without a default
UNDECLARED_ATTACK = '''
@attacks.register("undeclared")
class Undeclared(ImageAttack):
    paper = "none"
    description = "declares too little"

    @dataclass
    class Params:
        eps: float

    def perturb_images(self, victim, images, objective, generator):
        return images
'''

#: says it trains the image tower, trains everything: vanilla's loss on every parameter
OVERREACHING_DEFENSE = '''
from vlbench.training.defenses import ClassPromptParams
from vlbench.training.losses import class_prompt_loss


@defenses.register("overreaching")
class Overreaching(TrainingDefense):
    """Clean fine-tuning of every parameter, declaring the image tower alone."""
    paper = "none"
    description = "trains more than it declares"
    version = "1"
    trains_parameters = ("visual.",)
    Params = ClassPromptParams

    def fit(self, victim, run):
        batches = self.batches(victim, run)

        def loss_at(step):
            batch = batches.batch(step)
            return class_prompt_loss(victim.encode_image(batch.images), batch.class_weights, batch.labels,
                                     victim.logit_scale)
        return self.fit_parameters(victim, run, victim.model.parameters(), loss_at, {})
'''


@pytest.fixture
def plugin_file(tmp_path):
    registered = []

    def write(source: str, name: str):
        path = tmp_path / f"{name}.py"
        path.write_text(HEADER + textwrap.dedent(source))
        registered.append(name)
        return path

    yield write
    for name in registered:
        for registry in (api.attacks, api.defenses):
            if name in registry.names():
                registry.unregister(name)


def validate(capsys, target, checkpoint, *extra):
    code = main(["validate", str(target), "--pretrained", str(checkpoint), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def lines_with(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(status)]


def test_an_honest_attack_passes_every_check(capsys, plugin_file, world_checkpoint_path):
    code, out, _ = validate(capsys, plugin_file(GOOD_ATTACK, "step-once"), world_checkpoint_path)
    assert code == 0, out
    passed = lines_with(out, "PASS")
    assert len(passed) == 11 and not lines_with(out, "FAIL")
    for check in ("declares a version", "stays inside its threat model", "keeps pixels in [0, 1]",
                  "eps = 0 changes nothing", "the same seed gives the same result"):
        assert any(check in line for line in passed), check


def test_an_attack_that_breaks_its_promises_fails_each_with_its_reason(capsys, plugin_file, world_checkpoint_path):
    code, out, _ = validate(capsys, plugin_file(BAD_ATTACK, "reckless"), world_checkpoint_path)
    assert code == 2
    failed = "\n".join(lines_with(out, "FAIL"))
    assert "stays inside its threat model (a perturbation of Linf norm" in failed
    assert "keeps pixels in [0, 1] (pixels span" in failed
    assert "eps = 0 changes nothing (the images changed)" in failed
    assert "the same seed gives the same result (two runs differ)" in failed
    assert out.strip().splitlines()[-1] == "4 of 11 checks failed"


def test_a_missing_declaration_fails_before_anything_runs(capsys, plugin_file, world_checkpoint_path):
    code, out, _ = validate(capsys, plugin_file(UNDECLARED_ATTACK, "undeclared"), world_checkpoint_path)
    assert code == 2
    failed = "\n".join(lines_with(out, "FAIL"))
    assert "has a docstring (the class docstring is missing)" in failed
    assert "declares a version" in failed
    assert "Params is a dataclass of typed defaults (parameter 'eps' has no default)" in failed
    assert "n/a   attack undeclared: runs on the world (a static check failed)" in out


def test_builtin_defenses_train_only_what_they_declare(capsys, world_checkpoint_path):
    code, out, _ = validate(capsys, "tecoa", world_checkpoint_path)
    assert code == 0, out
    assert "PASS  defense tecoa: trains only what it declares" in out
    assert "PASS  defense tecoa: its checkpoint round-trips" in out
    code, out, _ = validate(capsys, "none", world_checkpoint_path)
    assert code == 0 and "n/a   defense none: trains only what it declares (it does not train)" in out


def test_a_defense_that_trains_more_than_it_declares_fails(capsys, plugin_file, world_checkpoint_path):
    code, out, _ = validate(capsys, plugin_file(OVERREACHING_DEFENSE, "overreaching"), world_checkpoint_path,
                            "--set", "lr=0.001")
    assert code == 2
    (line,) = [line for line in lines_with(out, "FAIL") if "trains only what it declares" in line]
    assert "tensors it does not declare trainable" in line and "trains_parameters = ('visual.',)" in line
    assert "PASS  defense overreaching: its checkpoint round-trips" in out


def test_a_text_attack_runs_with_its_options_on_the_world(capsys, world_checkpoint_path):
    code, out, _ = validate(capsys, "deepwordbug", world_checkpoint_path, "--set", "budget=2")
    assert code == 0, out
    assert "PASS  attack deepwordbug: stays inside its threat model" in out
    assert "PASS  attack deepwordbug: budget = 0 changes nothing" in out


@pytest.mark.parametrize("target, message", [
    ("pgdd", "'pgdd' is neither a plugin file nor a registered defense or attack"),
    ("missing.py", "plugin file missing.py does not exist"),
    ("broken.py", "broken.py does not import: SyntaxError"),
    ("empty.py", "empty.py registers no defense or attack"),
])
def test_bad_targets_are_one_line(capsys, tmp_path, monkeypatch, target, message, world_checkpoint_path):
    (tmp_path / "broken.py").write_text("def oops(:\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = validate(capsys, target, world_checkpoint_path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
