"""Square Attack: score-based black-box random search with square-shaped L∞ updates.

Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020, Algorithm 1 and §3.1 (L∞), with the
settings AutoAttack's standard version uses (Croce & Hein, ICML 2020; research/attacks_nn.md
B.1): 5,000 queries, p_init = 0.8, the margin loss ``z_y − max_{i≠y} z_i`` minimised,
initialisation with vertical stripes of ±ε, and the reference's piecewise-constant schedule
of the square's area fraction p (halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
of 10,000 rescaled queries). Each iteration draws one square position and one sign per
channel for the whole batch (as the reference does), sets that window of the perturbation to
±ε, and keeps the change for the samples whose loss went down. A sample stops being queried
once it is misclassified. Uses only the logits, never gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlbench.api import ImageAttack, attacks, check_range
from vlbench.errors import UserError
from vlbench.evaluation.perturb import from_255, linf_threat_model
from vlbench.monitor.cost import Work

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
             (6000, 128), (8000, 256))


def area_fraction(p_init: float, query: int, total: int) -> float:
    """The fraction of pixels a square covers at ``query`` (the reference's schedule)."""
    rescaled = int(query / total * 10000)
    divisor = 512
    for bound, value in _SCHEDULE:
        if rescaled <= bound:
            divisor = value
            break
    return p_init / divisor


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return true - other


@attacks.register("square")
class Square(ImageAttack):
    """Black-box L∞ random search over square patches."""

    paper = "Andriushchenko et al., ECCV 2020 (Square Attack, Algorithm 1)"
    description = "score-based black-box random search with square L-inf updates"
    version = "1"
    tasks = ("classification",)

    @dataclass
    class Params:
        eps: float = 4.0          # in 1/255
        norm: str = "Linf"
        queries: int = 5000
        p_init: float = 0.8

    def work(self, task, images, texts, classes):
        # one forward pass per query, about a third of a forward-backward; at most (samples
        # leave as soon as they break)
        return Work(image_grads=images * self.params.queries / 3)

    def validate(self) -> None:
        owner = f"attack {self.name}"
        if self.params.norm != "Linf":
            raise UserError(f"{owner} supports only norm Linf", "use norm: Linf")
        check_range(owner, "eps", self.params.eps, 0, 255, "/255")
        check_range(owner, "queries", self.params.queries, 1, 10_000_000)
        check_range(owner, "p_init", self.params.p_init, 0, 1)

    def threat_model(self) -> dict:
        return linf_threat_model(self.params.eps, access="scores")

    @torch.no_grad()
    def perturb_images(self, victim, images, objective, generator):
        eps = from_255(self.params.eps)
        if eps == 0:
            return images.clone()
        labels = objective.labels_for(None)
        count, channels, height, width = images.shape
        stripes = torch.randint(0, 2, (count, channels, 1, width), generator=generator).float() * 2 - 1
        best = (images + eps * stripes.to(images.device)).clamp(0, 1)
        best_margin = margin(objective.logits(best), labels)
        total = self.params.queries
        for query in range(1, total):
            live = (best_margin > 0).nonzero().squeeze(1)
            if len(live) == 0:
                break
            fraction = area_fraction(self.params.p_init, query, total)
            side = max(int(round(math.sqrt(fraction * height * width))), 1)
            side = min(side, height - 1, width - 1) if min(height, width) > 1 else 1
            top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
            signs = (torch.randint(0, 2, (channels, 1, 1), generator=generator).float() * 2 - 1).to(images.device)
            candidate = best[live].clone()
            candidate[:, :, top:top + side, left:left + side] += 2 * eps * signs
            origin = images[live]
            candidate = torch.min(torch.max(candidate, origin - eps), origin + eps).clamp(0, 1)
            new_margin = margin(objective.logits(candidate), labels[live])
            improved = new_margin < best_margin[live]
            best[live[improved]] = candidate[improved]
            best_margin[live[improved]] = new_margin[improved]
        return best
