"""Claimed against measured: the numbers a defense's paper reports, next to what a results
folder measured in the same setting.

A claim names its setting (model, optionally pretrained weights and the defense's parameters,
dataset, attack and epsilon, metric), the value and its source. Claims come from a defense
class's ``claimed`` table and from a submission's model card (``submission.json``, written by
``vlbench submit``). A cell measures a claim when its model, attack name, epsilon and the
defense parameters the claim names all match; ``dataset: mean`` is the mean over every
classification dataset measured in that setting (papers often report only that mean). A
measured number whose whole 95 % interval lies below the claim flags the defense "below
claimed", as RobustBench marks entries it could not reproduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from vlbench.errors import UserError

REQUIRED = ("model", "dataset", "attack", "eps", "metric", "value", "source")
OPTIONAL = ("pretrained", "params")
MEAN = "mean"
BELOW = "below claimed"


@dataclass(frozen=True)
class Claim:
    model: str
    dataset: str
    attack: str
    eps: float | None
    metric: str
    value: float
    source: str
    pretrained: str | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, raw: Any, owner: str) -> "Claim":
        if not isinstance(raw, dict):
            raise UserError(f"{owner}: a claimed number must be a mapping, not {raw!r}",
                            f"give each claim the keys {', '.join(REQUIRED)}")
        missing = [k for k in REQUIRED if k not in raw]
        unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
        if missing or unknown:
            problem = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(unknown)}"
            raise UserError(f"{owner}: the claim {raw!r} {problem}",
                            f"give each claim the keys {', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)})")
        try:
            value = float(raw["value"])
            eps = None if raw["eps"] is None else float(raw["eps"])
        except (TypeError, ValueError):
            raise UserError(f"{owner}: the claim {raw!r} has a value or eps that is not a number",
                            "write value in % and eps in 1/255 (null when clean)") from None
        params = raw.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"{owner}: the claim's params {params!r} is not a mapping", "write params: {eps: 4}")
        return cls(str(raw["model"]), str(raw["dataset"]), str(raw["attack"]), eps, str(raw["metric"]), value,
                   str(raw["source"]), None if raw.get("pretrained") is None else str(raw["pretrained"]),
                   tuple(sorted(params.items())))

    def setting(self) -> str:
        model = self.model + (f" ({self.pretrained})" if self.pretrained else "")
        attack = "clean" if self.attack == "none" else self.attack + (f" ε={self.eps:g}/255" if self.eps is not None
                                                                       else "")
        params = "".join(f", {k}={v}" for k, v in self.params)
        dataset = "mean over the classification datasets" if self.dataset == MEAN else self.dataset
        return f"{model}{params}: {dataset}, {attack}, {self.metric}"

    def matches(self, result: dict) -> bool:
        config = result.get("config", {})
        attack = config.get("attack", {})
        defense_params = config.get("defense", {}).get("params", {})
        if config.get("model") != self.model or attack.get("name") != self.attack:
            return False
        if self.pretrained is not None and config.get("pretrained") != self.pretrained:
            return False
        if self.dataset == MEAN:
            if result.get("task") != "classification":
                return False
        elif result.get("dataset") != self.dataset:
            return False
        if self.eps is not None:
            eps = attack.get("threat_model", {}).get("eps_255")
            if eps is None or not math.isclose(float(eps), self.eps, abs_tol=1e-6):
                return False
        if any(defense_params.get(k) != v for k, v in self.params):
            return False
        return self.metric in result.get("metrics", {})


def parse(raw: Any, owner: str) -> list[Claim]:
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{owner}: claimed must be a list of claims, not {type(raw).__name__}",
                        "write claimed: [{model: ..., dataset: ..., ...}]")
    return [Claim.from_dict(item, owner) for item in raw]


@dataclass
class Comparison:
    claim: Claim
    measured: Any | None  # a leaderboard Number, or None: not measured
    status: str           # "not measured", "below claimed", "consistent"


def compare(claims: list[Claim], results: list[dict], number_of) -> list[Comparison]:
    """Each claim against the cells of ``results`` (one defense's) that measure it;
    ``number_of(rows)`` makes a leaderboard number of long-table rows (one metric, one cell
    per dataset), so the comparison carries its interval."""
    comparisons = []
    for claim in claims:
        cells = [r for r in results if claim.matches(r)]
        if claim.dataset == MEAN and cells:
            # one cell per dataset: the newest, as the leaderboard shows
            cells = list({r["dataset"]: r for r in sorted(cells, key=lambda r: str(r.get("created")))}.values())
        elif cells:
            cells = [max(cells, key=lambda r: str(r.get("created")))]
        if not cells:
            comparisons.append(Comparison(claim, None, "not measured"))
            continue
        rows = pd.DataFrame([{"cell": r["cell"], "dataset": r["dataset"], "metric": claim.metric,
                              "value": float(r["metrics"][claim.metric])} for r in cells])
        measured = number_of(rows)
        upper = measured.value + (measured.half_width or 0.0)
        comparisons.append(Comparison(claim, measured, BELOW if upper < claim.value else "consistent"))
    return comparisons
