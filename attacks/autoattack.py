"""AutoAttack: the point-wise worst case over an ensemble of attacks.

Croce & Hein, ICML 2020, §4 ("AutoAttack"): the components run one after the other, each
only on the samples that every earlier component failed to break, and a sample counts as
robust only if no component breaks it (fra31/auto-attack issue #45; research/attacks_nn.md
B.1). Default ``version: custom`` with APGD-CE and APGD-T (100 iterations, 9 targets) is
the configuration used to evaluate CLIP in the FARE line of work (Schlarmann et al., ICML
2024; RobustVLM ``CLIP_eval``); ``version: standard`` is RobustBench's APGD-CE, APGD-T,
FAB-T and Square (5,000 queries); ``iterations`` sets both APGDs' and FAB-T's (100 each in
the reference), ``n_target_classes`` both targeted ones'. Every result records
the components and all their parameters, so a different configuration can never pass for
the standard one.
"""

from dataclasses import dataclass, field

import torch

from vlbench.api import ImageAttack, attacks, check_range
from vlbench.errors import UserError
from vlbench.evaluation.components import build_component

VERSIONS = {"custom": None, "standard": ["apgd-ce", "apgd-t", "fab-t", "square"]}


@attacks.register("autoattack")
class AutoAttack(ImageAttack):
    """Worst case over APGD-CE and APGD-T (custom) or the four standard components."""

    paper = "Croce & Hein, ICML 2020 (AutoAttack); CLIP protocol of Schlarmann et al., ICML 2024 (FARE)"
    description = "point-wise worst case over APGD-CE + APGD-T (or the standard four)"
    version = "1"
    tasks = ("classification",)

    @dataclass
    class Params:
        eps: float = 4.0          # L∞: in 1/255
        norm: str = "Linf"
        version: str = "custom"
        components: list = field(default_factory=lambda: ["apgd-ce", "apgd-t"])
        iterations: int = 100
        n_target_classes: int = 9
        square_queries: int = 5000

    def validate(self) -> None:
        owner = f"attack {self.name}"
        if self.params.version not in VERSIONS:
            raise UserError(f"{owner} version {self.params.version!r} is unknown", f"use one of {list(VERSIONS)}")
        check_range(owner, "eps", self.params.eps, 0, 255 if self.params.norm == "Linf" else 1000)
        names = VERSIONS[self.params.version] or list(self.params.components)
        if not names:
            raise UserError(f"{owner} has no components", "list at least one attack in components")
        missing = [n for n in names if n not in attacks]
        if missing:
            raise UserError(f"{owner} version {self.params.version!r} needs the attacks {missing}, "
                            "which are not registered", "use version: custom or install them")
        self.components = [build_component(owner, n, self._component_options(n), "image") for n in names]

    def _component_options(self, name: str) -> dict:
        options = {"eps": self.params.eps, "norm": self.params.norm}
        if name.startswith("apgd") or name == "fab-t":  # both 100 in the reference
            options["iterations"] = self.params.iterations
        if name in ("apgd-t", "fab-t"):
            options["n_target_classes"] = self.params.n_target_classes
        if name == "square":
            options["queries"] = self.params.square_queries
        return options

    def config(self) -> dict:
        return {**super().config(), "components": [c.config() for c in self.components],
                "worst_case_over_components": True}

    def threat_model(self) -> dict:
        return self.components[0].threat_model()

    def work(self, task, images, texts, classes):
        parts = [c.work(task, images, texts, classes) for c in self.components]
        return None if any(p is None for p in parts) else sum(parts[1:], parts[0])

    def perturb_images(self, victim, images, objective, generator):
        result = images.clone()
        with torch.no_grad():
            robust = objective.correct(images)
        for component in self.components:
            rows = robust.nonzero().squeeze(1)
            if len(rows) == 0:
                break
            part = objective.subset(rows)
            adversarial = component.perturb_images(victim, images[rows], part, generator)
            with torch.no_grad():
                still = part.correct(adversarial)
            result[rows] = adversarial
            robust[rows] = still
            for message in component.take_notes():
                self.note(message)
            for message in component.take_adjustments():
                self.adjust(message)
        return result
