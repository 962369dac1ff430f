"""The geometry image attacks share: L∞ / L2 balls in [0,1] pixel space, random starts,
steepest-ascent directions, and the margin losses of the robustness literature.

Random starts come from :class:`SampleNoise`, keyed by sample, so that an attack draws the
same start for a sample whichever batch or subset it sees it in: APGD-T inside AutoAttack
(on the samples APGD-CE left) then starts where standalone APGD-T does, and "the worst case
over components is at most each component" holds sample by sample, not only on average.

Losses take logits ``[B, C]`` and return one value per sample, to be *maximised*:

- cross-entropy;
- the Carlini–Wagner margin (Carlini & Wagner, S&P 2017, Eq. 6 ``f_6``, as PGD's loss in
  TeCoA's ``attack_CW``): ``-max(z_y - max_{i≠y} z_i, -κ)``;
- DLR (Croce & Hein, ICML 2020, Eq. 5): ``-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3)``;
- targeted DLR (ibid., Eq. 6): ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)``;
  with π the logits sorted in decreasing order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlbench.api import ImageAttack, check_range
from vlbench.errors import UserError
from vlbench.monitor.cost import Work

NORMS = ("Linf", "L2")


def from_255(value: float) -> float:
    """An L∞ budget or step given in 1/255 pixel units, as a fraction of the [0, 1] range."""
    return value / 255


def linf_threat_model(eps_255: float, **extra) -> dict:
    """The record of an L∞ image threat model whose radius is given in 1/255 units."""
    return {"modality": "image", "norm": "Linf", "eps": from_255(eps_255), "eps_255": eps_255, **extra}
_TINY = 1e-12


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project a perturbation onto the ``norm`` ball of radius ``eps``."""
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    scale = (eps / (_flat_norm(delta) + _TINY)).clamp(max=1.0)
    return delta * scale


def into_box(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The part of ``delta`` that keeps ``images + delta`` inside [0, 1]."""
    return (images + delta).clamp(0, 1) - images


class SampleNoise:
    """Random draws keyed by sample: the draw for one sample depends only on ``(seed, key,
    stream)``, never on which other samples share its batch.

    ``keys`` name the samples of a batch (the evaluator uses dataset indices); ``stream``
    names the draw (an attack's restart or run number), so restarts differ from each other.
    """

    def __init__(self, seed: int, keys):
        self.seed = int(seed)
        self.keys = torch.as_tensor(keys, dtype=torch.long).cpu()

    @classmethod
    def of(cls, objective, generator: torch.Generator, count: int) -> "SampleNoise":
        """The objective's per-sample noise, or, for an objective without one (training, a
        plugin's own objective), ``count`` anonymous samples under a seed from ``generator``."""
        noise = getattr(objective, "noise", None)
        if noise is not None:
            return noise
        return cls(int(torch.randint(0, 2 ** 62, (1,), generator=generator)), torch.arange(count))

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, rows: torch.Tensor) -> "SampleNoise":
        return SampleNoise(self.seed, self.keys[torch.as_tensor(rows).cpu()])

    def generator_for(self, key: int, stream) -> torch.Generator:
        """The generator of one sample's draw, seeded from a hash of ``(seed, key, stream)``."""
        digest = hashlib.blake2b(f"{self.seed}/{key}/{stream}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    def _draw(self, sampler, shape: tuple, stream) -> torch.Tensor:
        return torch.stack([sampler(shape, generator=self.generator_for(k, stream)) for k in self.keys.tolist()])

    def uniform(self, shape: tuple, stream=0) -> torch.Tensor:
        """``[len(self), *shape]`` draws from U[0, 1)."""
        return self._draw(torch.rand, shape, stream)

    def normal(self, shape: tuple, stream=0) -> torch.Tensor:
        """``[len(self), *shape]`` draws from N(0, 1)."""
        return self._draw(torch.randn, shape, stream)


def random_offset(images: torch.Tensor, norm: str, radius: float, noise: SampleNoise, stream=0) -> torch.Tensor:
    """A random perturbation of ``norm`` exactly ``radius`` per sample, shaped like
    ``images``: ``radius · t / ‖t‖`` with ``t ~ U[-1,1]`` (L∞) or ``N(0, 1)`` (L2), the random
    starts of APGD and FAB (fra31/auto-attack ``autopgd_base.py``, ``fab_base.py``) at
    radius ε and ε/2. Not clipped to the box."""
    t = noise.uniform(images.shape[1:], stream) * 2 - 1 if norm == "Linf" else noise.normal(images.shape[1:], stream)
    t = t.to(images.device, images.dtype)
    return radius * t / perturbation_norm(t, norm).clamp_min(_TINY).view(-1, *([1] * (images.dim() - 1)))


def random_start(images: torch.Tensor, norm: str, eps: float, noise: SampleNoise, stream=0) -> torch.Tensor:
    """A random perturbation inside the ball (uniform per pixel for L∞, uniform in the L2
    ball), drawn per sample from ``noise``."""
    shape = images.shape
    if norm == "Linf":
        delta = (noise.uniform(shape[1:], stream) * 2 - 1) * eps
    else:
        direction = noise.normal(shape[1:], stream)
        direction = direction / (_flat_norm(direction) + _TINY)
        dims = images[0].numel()
        radius = noise.uniform((), f"{stream}/radius") ** (1.0 / dims) * eps
        delta = direction * radius.view(-1, *([1] * (len(shape) - 1)))
    return into_box(images, delta.to(images.device, images.dtype))


def ascent_direction(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm`` for a gradient."""
    if norm == "Linf":
        return gradient.sign()
    return gradient / (_flat_norm(gradient) + _TINY)


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    return delta.flatten(1).abs().amax(dim=1) if norm == "Linf" else delta.flatten(1).norm(dim=1)


# -- losses on logits (per sample, higher = worse for the model) ----------------------------
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _true_and_best_other(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true, others.amax(dim=1)


def cw_margin(logits: torch.Tensor, labels: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    true, other = _true_and_best_other(logits, labels)
    return -(true - other).clamp(min=-kappa)


def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    ranked = logits.sort(dim=1, descending=True).values
    true, other = _true_and_best_other(logits, labels)
    return -(true - other) / (ranked[:, 0] - ranked[:, 2] + _TINY)


def targeted_dlr(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] < 4:
        raise ValueError("the targeted DLR loss needs at least 4 classes")
    ranked = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    target = logits.gather(1, targets[:, None]).squeeze(1)
    return -(true - target) / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + _TINY)


def targeted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Move towards ``targets``: the negative cross-entropy of the target class."""
    return -F.cross_entropy(logits, targets, reduction="none")


def projected_gradient_ascent(images: torch.Tensor, loss_fn, correct_fn, norm: str, eps: float,
                              step_size: float, steps: int, restarts: int, random_init: bool,
                              noise: SampleNoise, report=None) -> torch.Tensor:
    """PGD (Madry et al., ICLR 2018, §2) on ``loss_fn`` with restarts.

    Each restart runs from a fresh random start (``noise``, one row per image) on the samples ``correct_fn`` still reports
    correct; a sample keeps the first restart that breaks it, otherwise the restart with the
    highest final loss. ``loss_fn(images, rows)`` and ``correct_fn(images, rows)`` evaluate the
    given rows of the batch. The last iterate of each restart is its result (no best-iterate
    tracking, as TeCoA's PGD). ``report(message)`` hears of a loss that never increased over
    the first step's, AutoAttack's sign of a broken gradient.
    """
    if eps == 0 or steps == 0 and not random_init:
        return images.clone()
    best = images.clone()
    best_loss = torch.full((len(images),), float("-inf"), device=images.device)
    active = torch.arange(len(images), device=images.device)
    for restart in range(max(1, restarts)):
        if restart > 0:
            with torch.no_grad():
                still = correct_fn(best[active], active)
            active = active[still]
            if len(active) == 0:
                break
        x = images[active]
        delta = random_start(x, norm, eps, noise.subset(active), restart) if random_init else torch.zeros_like(x)
        first_loss = None
        for step in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(x + delta, active)
            (gradient,) = torch.autograd.grad(loss.sum(), delta)
            if step == 0:
                first_loss = loss.detach()
            elif step == steps - 1 and report is not None and not (loss.detach() > first_loss).any():
                report("loss never increased during the attack: gradients may be masked or zero")
            delta = delta.detach() + step_size * ascent_direction(gradient, norm)
            delta = into_box(x, project(delta, norm, eps))
        if restarts <= 1:
            return (x + delta).detach()
        with torch.no_grad():
            candidate = x + delta
            loss = loss_fn(candidate, active)
            broken = ~correct_fn(candidate, active)
        better = broken | (loss > best_loss[active])
        best[active[better]] = candidate[better]
        best_loss[active[better]] = loss[better]
    return best.detach()


def linf_pgd(images: torch.Tensor, loss_fn, eps: float, step_size: float, steps: int,
             generator: torch.Generator) -> torch.Tensor:
    """L∞ PGD from a uniform start, one restart, every sample for every step (``eps`` and
    ``step_size`` in [0,1] pixel units): the training attacks of TeCoA, MMCoA and N:N and the
    image stage of Co-Attack and SGA, which have no per-sample "already broken" test."""
    return projected_gradient_ascent(images, loss_fn, None, "Linf", eps, step_size, steps, 1, True,
                                     SampleNoise.of(None, generator, len(images)))


class NormBallAttack(ImageAttack):
    """Base of the image attacks bounded by an L∞ or L2 ball: ``params.norm`` and
    ``params.eps`` (L∞: in 1/255 pixel units; L2: a plain L2 norm in [0,1] pixel space) are
    validated here, and the threat model is reported from them; so are the iteration budget
    (``iterations``, ``restarts``) of the attacks whose parameters have one."""

    def validate(self) -> None:
        owner = f"attack {self.name}"
        if self.params.norm not in NORMS:
            raise UserError(f"{owner} norm {self.params.norm!r} is not supported", f"use one of {NORMS}")
        linf = self.params.norm == "Linf"
        check_range(owner, "eps", self.params.eps, 0, 255 if linf else 1000, "/255" if linf else "")
        for name, high in (("iterations", 100_000), ("restarts", 1000)):
            if hasattr(self.params, name):
                check_range(owner, name, getattr(self.params, name), 1, high)

    @property
    def eps(self) -> float:
        """The radius in [0,1] pixel units."""
        return from_255(self.params.eps) if self.params.norm == "Linf" else self.params.eps

    def threat_model(self) -> dict:
        if self.params.norm == "Linf":
            return linf_threat_model(self.params.eps)
        return {"modality": "image", "norm": self.params.norm, "eps": self.eps}

    def target_count(self, classes: int, asked: int) -> int:
        """How many target classes a targeted attack can use (at most ``classes - 1``),
        recording in the cell's adjustments when that is fewer than asked."""
        count = min(asked, classes - 1)
        if count < asked:
            self.adjust(f"{self.name}: {classes} classes allow only {count} target classes (asked for {asked})")
        return count


def attacked_samples(attack, objective, images: torch.Tensor):
    """``(rows, objective, images)`` of the samples ``attack`` works on: with an objective
    that sets ``attack_only_correct``, the samples the model gets right; else all of them."""
    if not getattr(objective, "attack_only_correct", False):
        return slice(None), objective, images
    # A sample the model already gets wrong counts as an error whatever the attack does, so
    # only the others are attacked (AutoAttack's rule; per-sample random starts make the
    # attacked samples' results the same as attacking them all).
    with torch.no_grad():
        rows = objective.correct(images).nonzero().squeeze(1)
    attack.adjust(f"{attack.name}: only the samples classified correctly when clean are attacked; "
                  "the others count as errors")
    return rows, objective.subset(rows), images[rows]


class ProjectedGradientAttack(NormBallAttack):
    """Base of the PGD family: parameters, threat model and loop; subclasses choose the loss.

    For L∞, ``eps`` and ``step_size`` are in 1/255 pixel units; for L2 they are plain L2
    norms in [0,1] pixel space.
    """

    deterministic = True  # starts come from the objective's per-sample noise

    @dataclass
    class Params:
        eps: float = 4.0         # L∞: in 1/255; L2: the L2 radius in [0,1] pixel units
        steps: int = 10
        step_size: float = 1.0   # α, same units as eps
        norm: str = "Linf"
        restarts: int = 1
        random_start: bool = True

    def validate(self) -> None:
        super().validate()
        owner = f"attack {self.name}"
        unit = "/255" if self.params.norm == "Linf" else ""
        high = 255 if self.params.norm == "Linf" else 1000
        check_range(owner, "step_size", self.params.step_size, 0, high, unit)
        check_range(owner, "steps", self.params.steps, 0, 100_000)

    def radius(self) -> tuple[float, float]:
        """``(eps, step_size)`` in [0,1] pixel units."""
        scale = from_255(1) if self.params.norm == "Linf" else 1.0
        return self.eps, self.params.step_size * scale

    def loss(self, objective, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def work(self, task, images, texts, classes):
        return Work(image_grads=images * self.params.steps * self.params.restarts)

    def perturb_images(self, victim, images: torch.Tensor, objective, generator: torch.Generator) -> torch.Tensor:
        eps, step_size = self.radius()
        result = images.clone()
        rows, objective, images = attacked_samples(self, objective, images)
        if len(images) == 0:
            return result
        result[rows] = projected_gradient_ascent(
            images, lambda x, r: self.loss(objective, x, r), objective.correct,
            self.params.norm, eps, step_size, self.params.steps, self.params.restarts,
            self.params.random_start, SampleNoise.of(objective, generator, len(images)), report=self.note)
        return result
