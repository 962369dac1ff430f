"""The undefended baseline: the base model exactly as loaded."""

from vlbench.api import Defense, defenses


@defenses.register("none")
class Undefended(Defense):
    """No defense: every attack meets the base model's weights."""

    paper = "-"
    description = "the base model as is (no fine-tuning)"
    version = "1"
    trains = False

    def fit(self, victim, run) -> dict:
        return {}

    def work(self):
        from vlbench.monitor.cost import Work

        return Work()
