"""Label smoothing: clean fine-tuning of the image encoder on label-smoothed cross-entropy.

Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, "Rethinking the Inception Architecture for Computer
Vision", CVPR 2016, §7 ("Model Regularization via Label Smoothing"): the one-hot target
δ_{k,y} is replaced by

    q'(k | x) = (1 - ε) δ_{k,y} + ε / K,

with K the number of classes and ε the smoothing (0.1 in the paper). Applied to the clean
class-prompt objective of the built-in ``vanilla`` defense (the TeCoA loss of Mao et al.,
ICLR 2023, §3, with no attack):

    L(θ) = E_(x,y) [ H( q'(· | x), softmax( s · cos(f_θ(x), w_c)_{c=1..C} ) ) ],

where ``f_θ`` is the image encoder being fine-tuned, ``w_c`` the frozen class-prompt
embeddings and ``s`` the frozen logit scale. Only the image encoder trains; with
``smoothing: 0`` the defense trains exactly as ``vanilla`` does. It is a regularisation
baseline, not an adversarial training: check any robustness it shows with ``vlbench audit``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlbench.api import defenses
from vlbench.errors import UserError
from vlbench.training.defenses import ClassPromptParams, TrainingDefense
from vlbench.training.losses import class_prompt_loss

__all__ = ["LabelSmoothing"]


@defenses.register("label-smoothing")
class LabelSmoothing(TrainingDefense):
    """Clean fine-tuning of the image encoder on label-smoothed class-prompt cross-entropy."""

    paper = "Szegedy et al., CVPR 2016 (Rethinking the Inception Architecture), §7"
    description = "clean fine-tuning of the image encoder with label-smoothed class-prompt cross-entropy"
    version = "1"
    trains_parameters = ("visual.",)  # only the image tower trains

    @dataclass
    class Params(ClassPromptParams):
        smoothing: float = 0.1  # ε: the target's mass spread uniformly over the classes

    def validate(self) -> None:
        super().validate()
        if not (0.0 <= self.params.smoothing < 1.0):
            raise UserError(f"defense {self.name} smoothing={self.params.smoothing} is out of range",
                            "use a value in [0, 1): 0 is plain cross-entropy, the paper uses 0.1")

    def fit(self, victim, run) -> dict:
        batches = self.batches(victim, run)
        smoothing = self.params.smoothing

        def loss_at(step: int):
            batch = batches.batch(step)
            return class_prompt_loss(victim.encode_image(batch.images), batch.class_weights, batch.labels,
                                     victim.logit_scale.detach(), label_smoothing=smoothing)

        return self.fit_parameters(victim, run, victim.model.visual.parameters(), loss_at, {})
