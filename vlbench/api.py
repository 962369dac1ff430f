"""The contracts a plugin implements: :class:`Attack` and :class:`Defense`.

A plugin is a class registered by name, with a paper reference, a one-line description and a
typed parameter set (a dataclass named ``Params`` whose defaults are the paper's)::

    from dataclasses import dataclass
    from vlbench.api import ImageAttack, attacks

    @attacks.register("my-attack")
    class MyAttack(ImageAttack):
        \"\"\"What it does, with the paper and equation it follows.\"\"\"
        paper = "Author et al., Venue Year"
        description = "one line for `vlbench ls attacks`"
        version = "1"      # bump when a change alters its results

        @dataclass
        class Params:
            eps: float = 4.0   # L-inf radius in 1/255 pixel units

        def perturb_images(self, victim, images, objective, generator): ...

``version`` is part of every result cell's and cached checkpoint's identity: bumping it
recomputes exactly the cells (and trained models) the plugin took part in, and nothing else.

Parameters are checked when the plugin is built from a config: an unknown key, a value of
the wrong type or one out of range is a one-line :class:`~vlbench.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Callable, ClassVar, Protocol

import torch

from vlbench import plugins
from vlbench.errors import UserError
from vlbench.registry import Registry
from vlbench.schema import check_type

MODALITIES = ("none", "image", "text", "multimodal")


class Plugin:
    """What attacks and defenses share: a name, a reference, typed parameters."""

    kind: ClassVar[str] = "plugin"
    paper: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: the plugin's code version, declared by every plugin (see the module docstring)
    version: ClassVar[str] = ""

    @dataclasses.dataclass
    class Params:
        pass

    def __init__(self, name: str, params: Any | None = None):
        self.name = name
        self.params = params if params is not None else self.Params()
        self.validate()

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any] | None) -> "Plugin":
        if not isinstance(cls.version, str) or not cls.version:
            raise UserError(f"{cls.kind} {name!r} ({cls.__module__}.{cls.__qualname__}) declares no version",
                            'add version = "1" to its class, and bump it whenever a change alters its results')
        return cls(name, coerce_params(cls.Params, options or {}, f"{cls.kind} {name!r}"))

    def validate(self) -> None:
        """Raise a :class:`UserError` for parameter values out of range."""

    def prepare(self) -> None:
        """Load what the plugin needs (models, files) before the first cell runs, so a missing
        resource fails the run up front instead of halfway through."""

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": dataclasses.asdict(self.params)}

    def pending(self) -> list[tuple[str, Any]]:
        """What :meth:`prepare` will build that is not cached yet, as ``(name, work)`` pairs
        (``work`` a :class:`vlbench.monitor.cost.Work`), for the plan a run prints first."""
        return []


def coerce_params(params_cls: type, options: dict[str, Any], owner: str) -> Any:
    """Build ``params_cls`` from a mapping, with one-line errors for bad keys and types."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    values = {}
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"{owner} has no parameter {key!r}",
                            f"{hint}its parameters are {', '.join(fields) or '(none)'}")
        values[key] = check_type(value, hints.get(key, Any), f"{owner} parameter {key!r}")
    return params_cls(**values)


def check_range(owner: str, name: str, value: float, low: float, high: float, unit: str = "") -> None:
    if not (low <= value <= high):
        raise UserError(f"{owner} {name}={value}{unit} is out of range",
                        f"use a value between {low} and {high}{unit}")


# -- attacks ------------------------------------------------------------------------------
class Objective(Protocol):
    """What a task asks an attack to maximise, per sample (supplied by the task).

    ``rows`` optionally names which samples of the batch ``images`` holds (an attack may
    keep working only on the samples that are still correct). Classification objectives
    also offer ``logits(images)``, ``labels_for(rows)`` and ``num_classes`` for attacks with
    margin losses. ``noise`` (a ``vlbench.evaluation.perturb.SampleNoise`` or None) keys random draws
    by sample, and ``subset(rows)`` gives the objective of a subset of the batch, noise and all.
    """

    noise: Any

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss of the victim on ``images`` (higher is worse for the victim)."""

    def correct(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample bool: does the victim still get the sample right?"""


class Attack(Plugin):
    """An attack: a threat model and a way to produce adversarial inputs."""

    kind = "attack"
    modality: ClassVar[str] = "image"
    #: the tasks the attack is defined for; the planner skips the others with a reason
    tasks: ClassVar[tuple[str, ...]] = ("classification", "retrieval")
    #: True when the output depends only on the victim, the inputs and the objective (its
    #: per-sample noise included), never on the generator: the evaluator then runs it once
    #: per (inputs, objective) and shares the result with every cell and multimodal stage of
    #: the same victim that poses the same problem
    deterministic: ClassVar[bool] = False

    def threat_model(self) -> dict[str, Any]:
        return {"modality": self.modality}

    def note(self, message: str) -> None:
        """Record a warning for the cell's result (e.g. a loss that never increased); the
        leaderboard flags cells that carry one."""
        self._record("notes", message)

    def adjust(self, message: str) -> None:
        """Record how the attack adapted its configuration to the task (e.g. fewer target
        classes than asked): kept in the cell's result, not flagged as a warning."""
        self._record("adjustments", message)

    def _record(self, kind: str, message: str) -> None:
        messages = self.__dict__.setdefault(kind, [])
        if message not in messages:
            messages.append(message)

    def take_notes(self) -> list[str]:
        return self.__dict__.pop("notes", [])

    def take_adjustments(self) -> list[str]:
        return self.__dict__.pop("adjustments", [])

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the cell's count ``name`` (e.g. candidate edits a text constraint
        rejected): the task records the counts among the cell's metrics."""
        counts = self.__dict__.setdefault("counts", {})
        counts[name] = counts.get(name, 0) + int(n)

    def take_counts(self) -> dict[str, int]:
        return self.__dict__.pop("counts", {})

    def work(self, task: str, images: int, texts: int, classes: int) -> Any:
        """The operations one cell runs (a :class:`vlbench.monitor.cost.Work`) on ``images`` images
        whose task has ``texts`` texts (class prompts or captions) and ``classes`` classes
        (0 for retrieval), for the run's time estimate; None if unknown."""
        return None

    def skip_reason(self, task: str) -> str | None:
        if task not in self.tasks:
            return f"{self.name} is defined for {', '.join(self.tasks)} only, not {task}"
        return None


class ImageAttack(Attack):
    """An attack on pixels: returns adversarial images in [0, 1]."""

    modality = "image"

    def perturb_images(self, victim, images: torch.Tensor, objective: Objective,
                       generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class TextObjective(Protocol):
    """What a task asks a text attack to maximise (supplied by the task).

    ``texts`` are the clean texts the attack may change (class prompts for classification,
    captions for retrieval); ``score(candidates, row)`` rates replacement texts for
    ``texts[row]`` in one batch, higher being worse for the victim. ``meaning`` is the
    dataset's parser from a text to what it states (compared with ``==``; the world's
    :func:`~vlbench.world.scenes.scene_from_caption`), or None when the dataset has none:
    attacks that must keep the meaning compare a candidate's with the clean text's.
    """

    texts: list[str]
    meaning: Callable[[str], Any] | None

    def score(self, candidates: list[str], row: int) -> torch.Tensor:
        ...


class TextAttack(Attack):
    """An attack on words: returns one perturbed text per clean text."""

    modality = "text"

    def perturb_texts(self, victim, objective: TextObjective, generator: torch.Generator) -> list[str]:
        raise NotImplementedError


class MultimodalAttack(Attack):
    """An attack on images and texts together, in up to three stages.

    The task calls ``attack_texts`` once (class prompts or all captions), ``attack_images``
    per image batch with the embeddings of the texts it returned, and ``final_texts`` once
    with the embeddings of all adversarial images (SGA re-attacks the captions against them).
    ``problem`` (a :class:`vlbench.evaluation.objectives.MultimodalProblem`) supplies the clean texts and
    embeddings and builds the task's image and text objectives.
    """

    modality = "multimodal"

    def attack_texts(self, problem, generator: torch.Generator) -> list[str]:
        return list(problem.texts)

    def attack_images(self, problem, rows: torch.Tensor, images: torch.Tensor,
                      text_embeddings: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images

    def final_texts(self, problem, texts: list[str], image_embeddings: torch.Tensor,
                    generator: torch.Generator) -> list[str]:
        return texts


class NoAttack(Attack):
    """The clean evaluation: the identity."""

    modality = "none"

    def work(self, task: str, images: int, texts: int, classes: int) -> Any:
        from vlbench.monitor.cost import Work

        return Work()


# -- defenses -----------------------------------------------------------------------------
class Defense(Plugin):
    """A defense: how a robust model is made from a base model.

    ``fit`` trains ``victim.model`` in place; the runner caches the resulting weights by
    (base model, defense name and parameters, training data), so a defense trains once and
    every attack and dataset reuses it. A defense that does not train sets ``trains = False``.
    """

    kind = "defense"
    trains: ClassVar[bool] = True
    #: which of ``victim.model``'s tensors ``fit`` may change, as prefixes of their
    #: ``state_dict`` names (``"visual."``: the image tower; ``""``: every tensor);
    #: ``vlbench validate`` trains a few steps and checks that nothing else changed
    trains_parameters: ClassVar[tuple[str, ...]] = ("",)
    #: the numbers its paper reports, each a dict with ``model``, ``dataset`` (or ``"mean"``:
    #: the mean over the classification datasets), ``attack``, ``eps`` (in 1/255; None when
    #: clean), ``metric``, ``value`` (%) and ``source`` (the paper's table or figure), and
    #: optionally ``pretrained`` and ``params`` (the defense parameters the number is for);
    #: the leaderboard sets each next to the measured number (:mod:`vlbench.reporting.claimed`)
    claimed: ClassVar[tuple[dict[str, Any], ...]] = ()

    def training_data(self) -> dict[str, Any]:
        """A description of the training data, part of the checkpoint's cache key."""
        return {}

    def check_training_data(self) -> None:
        """Raise a one-line :class:`UserError` if the training data is unknown, missing or of
        the wrong kind. The runner calls it before any work, so bad input never surfaces
        halfway through a run."""

    def work(self) -> Any:
        """The operations ``fit`` runs (a :class:`vlbench.monitor.cost.Work`), for the run's time
        estimate; None if unknown."""
        return None

    def apply(self, victim) -> None:
        """Change ``victim`` at inference time, after training and on every load from the
        cache: e.g. an input transform (``victim.set_input_transform``), which is not part of
        the weights. Nothing by default."""

    def fit(self, victim, run) -> dict[str, Any]:
        """Train ``victim`` in place; return a summary (losses, timings) for the record.

        ``run`` is a :class:`vlbench.training.loop.TrainingRun`: pass its ``workdir`` and
        ``checkpoint_every`` to :func:`vlbench.training.loop.fit` so training checkpoints
        and resumes.
        """
        raise NotImplementedError


def discover(extra_files=()) -> None:
    """Find every plugin: built-ins, entry points and ``extra_files`` (idempotent)."""
    plugins.load_all({"attacks": attacks, "defenses": defenses}, extra_files)


attacks: Registry[type[Attack]] = Registry("attack", base=Attack, on_miss=discover)
defenses: Registry[type[Defense]] = Registry("defense", base=Defense, on_miss=discover)


def registry_for(kind: str) -> Registry:
    return {"attacks": attacks, "defenses": defenses}[kind]


def build(kind: str, name: str, options: dict[str, Any] | None = None) -> Plugin:
    """Instantiate the registered plugin ``name`` of ``kind`` ('attacks' or 'defenses')."""
    discover()
    cls = registry_for(kind).get(name)
    return cls.from_config(name, options)
