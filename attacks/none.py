"""The clean evaluation, registered as the attack ``none`` so that clean and robust numbers
come out of the same matrix, the same subset and the same code path."""

from vlbench.api import NoAttack, attacks


@attacks.register("none")
class Clean(NoAttack):
    """No perturbation: the model is evaluated on the clean inputs."""

    paper = "-"
    description = "clean inputs (no attack)"
    version = "1"
