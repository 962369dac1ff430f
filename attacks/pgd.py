"""L-infinity projected gradient descent on images.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018, §2 (the PGD iteration
``x_{t+1} = Proj_{x+S}(x_t + α sign(∇_x L(θ, x_t, y)))``), with the random start of their §3.
Set-up as in the TeCoA lineage (Mao et al., ICLR 2023, ``attacks.py:attack_pgd``; see
research/attacks_nn.md B.1): the perturbation lives in [0,1] pixel space at the dataset's
resolution, starts uniform in [-ε, ε], takes sign steps, is projected onto the ε-ball and the
image box after every step, and the last iterate is returned. The loss is the task's
objective: cross-entropy over ``logit_scale·cos`` to the class prompts for classification and
the image→text contrastive loss against the gallery captions for retrieval.
"""

from dataclasses import dataclass

import torch

from vlbench.api import ImageAttack, attacks, check_range


@attacks.register("pgd")
class PGD(ImageAttack):
    """L∞ PGD with random start; ``eps`` and ``step_size`` in 1/255 pixel units."""

    paper = "Madry et al., ICLR 2018 (PGD); TeCoA evaluation protocol, Mao et al., ICLR 2023"
    description = "L-inf projected gradient descent on pixels, random start, sign steps"

    @dataclass
    class Params:
        eps: float = 4.0         # radius of the L∞ ball, in 1/255
        steps: int = 10          # gradient steps
        step_size: float = 1.0   # α, in 1/255
        random_start: bool = True

    def validate(self) -> None:
        owner = f"attack {self.name}"
        check_range(owner, "eps", self.params.eps, 0, 255, "/255")
        check_range(owner, "step_size", self.params.step_size, 0, 255, "/255")
        check_range(owner, "steps", self.params.steps, 0, 100_000)

    def threat_model(self) -> dict:
        return {"modality": "image", "norm": "Linf", "eps": self.params.eps / 255,
                "eps_255": self.params.eps}

    def perturb_images(self, victim, images: torch.Tensor, objective,
                       generator: torch.Generator) -> torch.Tensor:
        eps = self.params.eps / 255
        alpha = self.params.step_size / 255
        if eps == 0:
            return images.clone()
        if self.params.random_start:
            noise = torch.rand(images.shape, generator=generator, dtype=images.dtype)
            delta = ((noise * 2 - 1) * eps).to(images.device)
        else:
            delta = torch.zeros_like(images)
        delta = (images + delta).clamp(0, 1) - images
        for _ in range(self.params.steps):
            delta.requires_grad_(True)
            loss = objective.loss(images + delta).sum()
            (gradient,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * gradient.sign()).clamp(-eps, eps)
            delta = (images + delta).clamp(0, 1) - images
        return (images + delta).detach()
