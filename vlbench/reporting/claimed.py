"""Claimed against measured: the numbers a defense's paper reports, next to what a results
folder measured in the same setting.

A claim names its setting (model, optionally pretrained weights and the defense's parameters,
dataset, attack and epsilon, metric), the value and its source. Claims come from a defense
class's ``claimed`` table, a model card entry's (``models.yaml``) and a submission record
(``submission.json``, written by ``vlbench submit``). A cell measures a claim when its model, attack name, epsilon and the
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

from vlbench.reporting.cells import base_model
from vlbench.schema import MEAN, Claim

BELOW = "below claimed"


def measures(claim: Claim, result: dict) -> bool:
    """Whether the cell ``result`` measures ``claim``: the same base architecture (and the
    pretrained weights, where the claim names them: a model entry or an open_clip tag), attack,
    epsilon, defense parameters, and dataset (any classification dataset for ``mean``)."""
    config = result.get("config", {})
    attack = config.get("attack", {})
    defense_params = config.get("defense", {}).get("params", {})
    model = base_model(result)
    if model.get("arch") != claim.model or attack.get("name") != claim.attack:
        return False
    if claim.pretrained is not None and claim.pretrained not in (model.get("entry"), model.get("tag")):
        return False
    if claim.dataset == MEAN:
        if result.get("task") != "classification":
            return False
    elif result.get("dataset") != claim.dataset:
        return False
    if claim.eps is not None:
        eps = attack.get("threat_model", {}).get("eps_255")
        if eps is None or not math.isclose(float(eps), claim.eps, abs_tol=1e-6):
            return False
    if any(defense_params.get(k) != v for k, v in claim.params):
        return False
    return claim.metric in result.get("metrics", {})


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
        cells = [r for r in results if measures(claim, r)]
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
