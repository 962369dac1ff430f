"""A defense that masks gradients on purpose, for the audit's tests (a plugin file, not a
registered built-in): the image is quantised to a few levels per channel before the model,
through ``torch.round``, whose gradient is zero almost everywhere. This is the "shattered
gradients" of Athalye, Carlini & Wagner (ICML 2018, §4.1), as input-quantisation and
thermometer-encoding defenses had them: white-box gradient attacks find nothing, while
black-box, transferred and large-budget attacks are unaffected."""

from dataclasses import dataclass

import torch

from vlbench.api import Defense, defenses


@defenses.register("quantised-input")
class QuantisedInput(Defense):
    """Rounds every pixel to one of ``levels`` values before the model sees it."""

    paper = "-"
    description = "input quantisation with a zero gradient (masks gradients; a test fixture)"
    version = "1"
    trains = False

    @dataclass
    class Params:
        levels: int = 8

    def apply(self, victim) -> None:
        steps = self.params.levels - 1
        victim.set_input_transform(lambda pixels: torch.round(pixels * steps) / steps,
                                   {"transform": "round", "levels": self.params.levels})

    def fit(self, victim, run) -> dict:
        return {}

    def work(self):
        from vlbench.monitor.cost import Work

        return Work()
