"""Projected gradient descent on images, L∞ (default) or L2.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018, §2 (the PGD iteration
``x_{t+1} = Proj_{x+S}(x_t + α · sign(∇_x L(θ, x_t, y)))``; for L2 the step is the normalised
gradient) with the random start of their §3. Set-up as in the TeCoA lineage (Mao et al.,
ICLR 2023, ``attacks.py:attack_pgd``; research/attacks_nn.md B.1): the perturbation lives in
[0,1] pixel space at the dataset's resolution, starts uniformly in the ball, takes sign
steps, is projected onto the ball and the image box after every step, and the last iterate
is returned. Restarts attack only the samples still correct. The loss is the task's
objective: cross-entropy over ``logit_scale·cos`` to the class prompts for classification,
the image→text contrastive loss against the gallery captions for retrieval. On
classification, samples the model already misclassifies are left unattacked and count as
errors, as AutoAttack counts them (each cell's adjustments say so); retrieval attacks every
image, whose other metrics (text→image, R@5, R@10) do not follow from its top-1.
"""

from vlbench.api import attacks
from vlbench.evaluation.perturb import ProjectedGradientAttack


@attacks.register("pgd")
class PGD(ProjectedGradientAttack):
    """PGD on the task's objective; ``eps``/``step_size`` in 1/255 for L∞, plain L2 norm for L2."""

    paper = "Madry et al., ICLR 2018 (PGD); TeCoA evaluation protocol, Mao et al., ICLR 2023"
    description = "projected gradient descent on pixels (L-inf or L2), random start, restarts"
    version = "1"

    def loss(self, objective, images, rows):
        return objective.loss(images, rows)
