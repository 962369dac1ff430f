"""The base of the retrieval attacks that pair a registered text attack with L-inf PGD on the
images (Co-Attack, SGA): a helper beside those two plugins, not a plugin itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlbench.api import MultimodalAttack, check_range
from vlbench.evaluation.components import build_component
from vlbench.evaluation.perturb import from_255, linf_pgd
from vlbench.monitor.cost import Work


class TextThenImagePGDAttack(MultimodalAttack):
    """Base of the retrieval attacks that pair a registered text attack with L∞ PGD on the
    images under an attack-specific loss (Co-Attack, SGA): shared parameters, validation,
    threat model and the image loop. Subclasses write ``attack_texts`` and ``image_loss``.
    """

    tasks = ("retrieval",)

    @dataclass
    class Params:
        eps: float = 2.0          # in 1/255
        steps: int = 10
        step_size: float = 0.5    # in 1/255
        text_attack: str = "bert-attack"
        text_params: dict = field(default_factory=lambda: {"budget": 1})

    def validate(self) -> None:
        owner = f"attack {self.name}"
        check_range(owner, "eps", self.params.eps, 0, 255, "/255")
        check_range(owner, "step_size", self.params.step_size, 0, 255, "/255")
        check_range(owner, "steps", self.params.steps, 0, 100_000)
        self.text = build_component(owner, self.params.text_attack, self.params.text_params, "text")

    def prepare(self) -> None:
        self.text.prepare()

    def pending(self):
        return self.text.pending()

    #: times the text attack runs (SGA: before and after the image stage), for :meth:`work`
    text_stages = 1

    def image_copies(self) -> int:
        """Image encodings per PGD step (SGA: the image and its scale copies)."""
        return 1

    def work(self, task, images, texts, classes):
        text = self.text.work(task, 0, texts, classes)
        if text is None:
            return None
        return text * self.text_stages + Work(image_grads=images * self.params.steps * self.image_copies())

    def config(self) -> dict:
        return {**super().config(), "components": [self.text.config()]}

    def threat_model(self) -> dict:
        return {"modality": "multimodal", "image": {"norm": "Linf", "eps": from_255(self.params.eps),
                                                    "eps_255": self.params.eps},
                "text": self.text.threat_model()}

    def image_loss(self, problem, rows: torch.Tensor, text_embeddings: torch.Tensor, generator: torch.Generator):
        """``loss(x, subset)`` to maximise for the images of ``rows``, one value per image."""
        raise NotImplementedError

    def attack_images(self, problem, rows, images, text_embeddings, generator):
        loss = self.image_loss(problem, rows, text_embeddings.to(images.device), generator)
        p = self.params
        return linf_pgd(images, loss, from_255(p.eps), from_255(p.step_size), p.steps, generator)
