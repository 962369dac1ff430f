"""PGD on the Carlini–Wagner margin loss.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017,
Eq. 6 (the objective ``f_6(x') = max(Z(x')_y − max_{i≠y} Z(x')_i, −κ)``), optimised as in the
TeCoA lineage's ``attack_CW`` (Mao et al., ICLR 2023; research/defenses.md §1 and
research/attacks_nn.md B.1): the same L∞ PGD loop as ``pgd`` (random start, sign steps,
projection, last iterate) with the margin in place of cross-entropy and confidence κ = 50.
Logits are the zero-shot ``logit_scale·cos`` to the class prompts, so this attack is defined
for classification only.
"""

from dataclasses import dataclass

from vlbench.api import attacks, check_range
from vlbench.evaluation.perturb import ProjectedGradientAttack, cw_margin


@attacks.register("cw")
class CWMargin(ProjectedGradientAttack):
    """PGD that drives the true-class margin below −κ."""

    paper = "Carlini & Wagner, IEEE S&P 2017 (margin loss, Eq. 6); TeCoA attack_CW, Mao et al., ICLR 2023"
    description = "PGD on the CW margin loss (kappa 50), L-inf by default"
    version = "1"
    tasks = ("classification",)

    @dataclass
    class Params(ProjectedGradientAttack.Params):
        kappa: float = 50.0

    def validate(self) -> None:
        super().validate()
        check_range(f"attack {self.name}", "kappa", self.params.kappa, 0, 1e6)

    def loss(self, objective, images, rows):
        return cw_margin(objective.logits(images), objective.labels_for(rows), self.params.kappa)
