"""A transfer attack: adversarial images crafted on the undefended model, shown to the defense.

Papernot, McDaniel, Goodfellow, "Transferability in Machine Learning" (arXiv 1605.07277,
2016) for transfer between models; as a check of a defense's own gradients, Athalye,
Carlini, Wagner, ICML 2018, §3 and Carlini et al., "On Evaluating Adversarial Robustness"
(arXiv 1902.06705, 2019), §5.3 ("transfer attacks"): a white-box attack that is weaker than
one crafted on another model has not found the gradients it needed. The inner attack is any
registered image attack, run on the same problem posed to the undefended model the defense
was made from (its own class weights or caption embeddings), with the same per-sample random
starts; its images are then classified by the defended model. Samples the defended model
already gets wrong count as errors and are not attacked, as in the ``pgd`` cells.
"""

from dataclasses import dataclass, field

import torch

from vlbench.api import ImageAttack, attacks
from vlbench.errors import UserError
from vlbench.evaluation.components import build_component
from vlbench.evaluation.perturb import attacked_samples


@attacks.register("transfer")
class Transfer(ImageAttack):
    """An image attack run on the undefended model, its images evaluated on the defense."""

    paper = "Papernot et al., arXiv 1605.07277 (transferability); Carlini et al., arXiv 1902.06705 §5.3"
    description = "an image attack crafted on the undefended model, evaluated on the defense"
    version = "1"

    @dataclass
    class Params:
        attack: str = "pgd"
        params: dict = field(default_factory=lambda: {"eps": 4.0, "steps": 10, "step_size": 1.0})

    def validate(self) -> None:
        self.inner = build_component(f"attack {self.name}", self.params.attack, self.params.params, "image")
        self.deterministic = self.inner.deterministic

    def prepare(self) -> None:
        self.inner.prepare()

    def pending(self):
        return self.inner.pending()

    def work(self, task, images, texts, classes):
        return self.inner.work(task, images, texts, classes)

    def config(self) -> dict:
        return {**super().config(), "components": [self.inner.config()]}

    def threat_model(self) -> dict:
        return {**self.inner.threat_model(), "source": "undefended"}

    def perturb_images(self, victim, images: torch.Tensor, objective, generator: torch.Generator) -> torch.Tensor:
        source = victim.undefended
        if source is None:
            raise UserError(f"attack {self.name} needs the undefended model the defense was made from",
                            "run it through `vlbench run matrix` or `vlbench audit`, which load it")
        result = images.clone()
        rows, objective, images = attacked_samples(self, objective, images)
        if len(images) == 0:
            return result
        crafted = self.inner.perturb_images(source, images, objective.on(source), generator)
        for message in self.inner.take_notes():
            self.note(message)
        for message in self.inner.take_adjustments():
            self.adjust(f"on the undefended model: {message}")
        result[rows] = crafted
        return result
