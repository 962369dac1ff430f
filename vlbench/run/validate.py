"""``vlbench validate PLUGIN``: check a defense or an attack before anyone spends compute on it.

Static checks read the class: it registers, it has a docstring, a ``paper``, a
``description`` and a ``version``, and its ``Params`` is a dataclass whose every field has a
type and a default (so the plugin builds from an empty config). Dynamic checks run it on the
synthetic world, with the world CLIP (or the checkpoint given):

- an attack: its output stays inside the threat model it declares (an image ball's norm
  and radius, a text budget of words), pixels stay in [0, 1], a zero budget changes nothing,
  and the same seed gives the same output (the promises ``tests/test_image_attacks.py``
  makes of the built-ins, asked of any attack);
- a defense: a few training steps on the world change only the parameters it declares
  trainable (:attr:`vlbench.api.Defense.trains_parameters`), and its checkpoint, written
  and read as the runner does (safetensors), gives back the same model.

Each check is one :class:`Check` line: passed, failed with the reason, or not applicable
with the reason (e.g. an attack without an ``eps`` parameter has no zero budget to try).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from vlbench import api, plugins
from vlbench.errors import UserError

#: samples of the world the dynamic checks run on
SAMPLES = 12
#: the world tasks the dynamic checks pose: class prompts, captions
CLASSIFICATION, RETRIEVAL = "world-colour", "world-retrieval"
#: slack on a measured perturbation norm, for float32 rounding
TOLERANCE = 1e-5


@dataclass
class Check:
    plugin: str
    name: str
    status: str  # "pass", "fail" or "n/a"
    reason: str = ""

    def line(self) -> str:
        mark = {"pass": "PASS", "fail": "FAIL", "n/a": "n/a "}[self.status]
        return f"{mark}  {self.plugin}: {self.name}" + (f" ({self.reason})" if self.reason else "")


def _run(plugin: str, name: str, body: Callable[[], str | None]) -> Check:
    """One check: ``body`` returns None to pass or a reason to fail; it raises
    :class:`NotApplicable` when the check does not apply, anything else fails the check."""
    try:
        reason = body()
    except NotApplicable as exc:
        return Check(plugin, name, "n/a", str(exc))
    except Exception as exc:  # a plugin's bug is the check's finding, not validate's crash
        return Check(plugin, name, "fail", f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return Check(plugin, name, "pass" if reason is None else "fail", reason or "")


class NotApplicable(Exception):
    """The check does not apply to this plugin (the reason is the message)."""


# -- which plugins ---------------------------------------------------------------------------
def plugins_of(target: str) -> list[tuple[str, str]]:
    """``(kind, name)`` of the plugins ``target`` names: a plugin file (every plugin it
    registers) or a registered name (a defense, an attack, or both)."""
    api.discover()
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"plugin file {path} does not exist", "pass the path of a .py file that registers plugins")
        before = {kind: set(api.registry_for(kind).names()) for kind in ("defenses", "attacks")}
        plugins.load_files([path])
        failed = [f for f in plugins.failures if f.source == str(path.resolve())]
        if failed:
            raise UserError(f"plugin file {path} does not import: {failed[0].error}", "fix the error, then validate again")
        source = path.read_text()
        # what its decorators name (also when an earlier --plugin already imported it), and
        # whatever else the import registered
        found = [(kind, name) for kind in ("defenses", "attacks")
                 for name in sorted({n for n, _, _ in plugins.registered_names(source, str(path), kind)}
                                    | (set(api.registry_for(kind).names()) - before[kind]))]
        if not found:
            raise UserError(f"plugin file {path} registers no defense or attack",
                            "decorate its class with @defenses.register(\"name\") or @attacks.register(\"name\")")
        return found
    found = [(kind, target) for kind in ("defenses", "attacks") if target in api.registry_for(kind).names()]
    if not found:
        raise UserError(f"{target!r} is neither a plugin file nor a registered defense or attack",
                        f"{api.defenses.unknown_message(target)}; {api.attacks.unknown_message(target)}")
    return found


# -- static ----------------------------------------------------------------------------------
def static_checks(kind: str, name: str) -> list[Check]:
    cls = api.registry_for(kind).get(name)
    label = f"{kind[:-1]} {name}"

    def text(attribute: str, what: str) -> Callable[[], str | None]:
        def body() -> str | None:
            value = cls.__dict__.get(attribute) if attribute == "__doc__" else getattr(cls, attribute, "")
            if not isinstance(value, str) or not value.strip():
                return f"{what} is missing"
            return None
        return body

    def params() -> str | None:
        if not dataclasses.is_dataclass(cls.Params):
            return "Params is not a dataclass"
        hints = typing.get_type_hints(cls.Params)
        for field in dataclasses.fields(cls.Params):
            if field.name not in hints:
                return f"parameter {field.name!r} has no type"
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                return f"parameter {field.name!r} has no default"
        return None

    def builds() -> str | None:
        api.build(kind, name, {})
        return None

    return [_run(label, "registers", lambda: None),
            _run(label, "has a docstring", text("__doc__", "the class docstring")),
            _run(label, "names its paper", text("paper", "paper")),
            _run(label, "has a description", text("description", "description")),
            _run(label, "declares a version", text("version", 'version (e.g. version = "1")')),
            _run(label, "Params is a dataclass of typed defaults", params),
            _run(label, "builds from its defaults", builds)]


# -- the world --------------------------------------------------------------------------------
class World:
    """The world victim and small problems on it, built once for every dynamic check."""

    def __init__(self, victim):
        from vlbench.data.datasets import load_dataset, subset_indices
        from vlbench.evaluation.context import class_prompts, classifier_weights
        from vlbench.evaluation.perturb import SampleNoise

        self.victim = victim
        victim.set_undefended(victim)  # a transfer attack crafts on it
        data = load_dataset(CLASSIFICATION)
        indices = subset_indices(len(data.images), SAMPLES, 0)
        self.images = torch.stack([data.images[i][0] for i in indices])
        self.labels = torch.tensor([int(data.images[i][1]) for i in indices])
        self.classnames, self.templates = data.classnames, data.templates
        self.noise = SampleNoise(0, indices)
        self.weights = classifier_weights(victim, self.classnames, self.templates)
        self.prompts = class_prompts(self.classnames, self.templates[:1])
        captions = load_dataset(RETRIEVAL)
        self.captions = [caption for row in captions.captions[:4] for caption in row[:2]]

    def weights_for(self, victim) -> torch.Tensor:
        from vlbench.evaluation.context import classifier_weights

        return classifier_weights(victim, self.classnames, self.templates)

    def objective(self):
        from vlbench.evaluation.objectives import ClassificationObjective

        return ClassificationObjective(self.victim, self.weights, self.labels, self.noise,
                                       weights_for=self.weights_for)

    def text_objective(self, texts: list[str]):
        from vlbench.evaluation.objectives import EmbeddingShiftObjective
        from vlbench.world.scenes import scene_from_caption

        with torch.no_grad():
            embeddings = self.victim.encode_texts(texts)
        return EmbeddingShiftObjective(self.victim, texts, embeddings, meaning=scene_from_caption)

    def problem(self):
        from vlbench.evaluation.objectives import MultimodalProblem
        from vlbench.world.scenes import scene_from_caption

        with torch.no_grad():
            texts = self.prompts
            return MultimodalProblem("classification", self.victim, texts, self.victim.encode_texts(texts),
                                     self.victim.encode_image(self.images), labels=self.labels,
                                     n_classes=len(self.classnames), noise=self.noise, meaning=scene_from_caption)


def _budget_reason(threat: dict, images: torch.Tensor, adversarial: torch.Tensor) -> str | None:
    from vlbench.evaluation.perturb import perturbation_norm

    if adversarial.shape != images.shape:
        return f"returned images of shape {tuple(adversarial.shape)} for {tuple(images.shape)}"
    if "norm" not in threat or "eps" not in threat:
        return "its threat_model() declares no image norm and eps"
    largest = float(perturbation_norm(adversarial - images, threat["norm"]).max())
    if largest > threat["eps"] + TOLERANCE:
        return f"a perturbation of {threat['norm']} norm {largest:.6f} exceeds eps {threat['eps']:.6f}"
    return None


def _box_reason(adversarial: torch.Tensor) -> str | None:
    low, high = float(adversarial.min()), float(adversarial.max())
    return None if 0 <= low and high <= 1 else f"pixels span [{low:.4f}, {high:.4f}]"


def _words_reason(threat: dict, texts: list[str], adversarial: list[str]) -> str | None:
    from vlbench.evaluation.words import changed_words

    if len(adversarial) != len(texts):
        return f"returned {len(adversarial)} texts for {len(texts)}"
    if "word_budget" not in threat:
        return "its threat_model() declares no word_budget"
    most = max(changed_words(a, b) for a, b in zip(texts, adversarial))
    return None if most <= threat["word_budget"] else f"{most} words changed, budget {threat['word_budget']}"


def _zero_budget(name: str, field: str, options: dict) -> api.Attack:
    fields = {f.name for f in dataclasses.fields(api.attacks.get(name).Params)}
    if field not in fields:
        raise NotApplicable(f"it has no {field!r} parameter")
    return api.build("attacks", name, {**options, field: 0})


def attack_checks(name: str, world: World, options: dict) -> Iterator[Check]:
    attack = api.build("attacks", name, options)
    label = f"attack {name}"
    attack.prepare()
    modality = attack.modality
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    if modality == "image":
        def images(a):
            return a.perturb_images(world.victim, world.images.clone(), world.objective(), seed())
        adversarial = images(attack)
        yield _run(label, "stays inside its threat model",
                   lambda: _budget_reason(attack.threat_model(), world.images, adversarial))
        yield _run(label, "keeps pixels in [0, 1]", lambda: _box_reason(adversarial))
        yield _run(label, "eps = 0 changes nothing", lambda: None if torch.equal(
            images(_zero_budget(name, "eps", options)), world.images) else "the images changed")
        yield _run(label, "the same seed gives the same result",
                   lambda: None if torch.equal(images(attack), adversarial) else "two runs differ")
    elif modality == "text":
        def texts(a):
            return a.perturb_texts(world.victim, world.text_objective(world.captions), seed())
        adversarial = texts(attack)
        yield _run(label, "stays inside its threat model",
                   lambda: _words_reason(attack.threat_model(), world.captions, adversarial))
        yield _run(label, "budget = 0 changes nothing", lambda: None if texts(
            _zero_budget(name, "budget", options)) == world.captions else "the texts changed")
        yield _run(label, "the same seed gives the same result",
                   lambda: None if texts(attack) == adversarial else "two runs differ")
    elif modality == "multimodal":
        if "classification" not in attack.tasks:
            yield Check(label, "runs on world classification", "n/a",
                        "defined for retrieval only; run it on world-retrieval with `vlbench run matrix`")
            return

        def both(a):
            problem = world.problem()
            texts = a.attack_texts(problem, seed())
            with torch.no_grad():
                embeddings = world.victim.encode_texts(texts)
            adversarial = a.attack_images(problem, torch.arange(len(world.images)), world.images.clone(),
                                          embeddings, seed())
            with torch.no_grad():
                image_embeddings = world.victim.encode_image(adversarial)
            return a.final_texts(problem, texts, image_embeddings, seed()), adversarial
        texts, adversarial = both(attack)
        threat = attack.threat_model()
        yield _run(label, "its images stay inside its threat model",
                   lambda: _budget_reason(threat.get("image", {}), world.images, adversarial))
        yield _run(label, "its texts stay inside its threat model",
                   lambda: _words_reason(threat.get("text", {}), world.prompts, texts))
        yield _run(label, "keeps pixels in [0, 1]", lambda: _box_reason(adversarial))
        yield _run(label, "eps = 0 leaves the images alone", lambda: None if torch.equal(
            both(_zero_budget(name, "eps", options))[1], world.images) else "the images changed")
        yield _run(label, "the same seed gives the same result",
                   lambda: None if _equal(both(attack), (texts, adversarial)) else "two runs differ")
    else:
        yield Check(label, "perturbs something", "n/a", f"modality {modality!r}: nothing to perturb")


def _equal(a: tuple[list[str], torch.Tensor], b: tuple[list[str], torch.Tensor]) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1])


# -- defenses ---------------------------------------------------------------------------------
#: the short training every defense gets on the world: a few steps of a small batch
SHORT_TRAINING = {"steps": 3, "batch_size": 4, "warmup": 0}


def short_training_options(cls: type[api.Defense]) -> dict:
    """The defense's parameters for a few steps on the world's own training data."""
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    options = {key: value for key, value in SHORT_TRAINING.items() if key in fields}
    if "train_datasets" in fields:
        tasks = getattr(cls, "training_tasks", ("classification",))
        options["train_datasets"] = [CLASSIFICATION if "classification" in tasks else RETRIEVAL]
    return options


def _declared(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name.startswith(prefix) for prefix in prefixes)


def defense_checks(name: str, world: World, options: dict) -> Iterator[Check]:
    from safetensors.torch import load_file

    from vlbench.store.files import atomic_save_tensors
    from vlbench.training.loop import TrainingRun

    cls = api.defenses.get(name)
    label = f"defense {name}"
    if not cls.trains:
        yield Check(label, "trains only what it declares", "n/a", "it does not train")
        return
    defense = api.build("defenses", name, {**short_training_options(cls), **options})
    defense.check_training_data()
    defense.prepare()
    before = {key: value.clone() for key, value in world.victim.model.state_dict().items()}
    victim = copy.deepcopy(world.victim)
    with tempfile.TemporaryDirectory() as folder:
        defense.fit(victim, TrainingRun(progress=False, workdir=Path(folder) / "partial"))
        victim.requires_grad_(False)
        victim.eval()
        victim.weights_changed()
        after = victim.model.state_dict()
        changed = [key for key in before if not torch.equal(before[key], after[key])]
        declared = tuple(cls.trains_parameters)

        def only_declared() -> str | None:
            if not changed:
                return f"{SHORT_TRAINING['steps']} training steps changed no parameter"
            outside = [key for key in changed if not _declared(key, declared)]
            if outside:
                return (f"changed {len(outside)} tensors it does not declare trainable, e.g. {outside[0]!r} "
                        f"(trains_parameters = {declared!r})")
            return None
        yield _run(label, "trains only what it declares", only_declared)

        def round_trip() -> str | None:
            path = Path(folder) / "checkpoint.safetensors"
            atomic_save_tensors(path, after)
            reloaded = copy.deepcopy(world.victim)
            reloaded.model.load_state_dict(load_file(str(path)))
            reloaded.weights_changed()
            defense.apply(victim)
            defense.apply(reloaded)
            with torch.no_grad():
                same = torch.equal(victim.encode_image(world.images), reloaded.encode_image(world.images))
            return None if same else "the reloaded model's image embeddings differ"
        yield _run(label, "its checkpoint round-trips", round_trip)


# -- all of it --------------------------------------------------------------------------------
def world_model(model: str | None = None, pretrained: str | None = None,
                extra: dict | None = None) -> Callable[[], object]:
    """A loader of the world model plugins are validated on: ``model`` (with ``pretrained``
    weights) when it is a world CLIP, else the card's world CLIP; loaded as any entry is."""
    def load():
        from vlbench.models.factory import create_victim, named_model
        from vlbench.models.victim import WORLD_MODEL
        from vlbench.world.pretrain import WORLD_ENTRY

        spec = named_model(model, pretrained, extra) if model is not None else None
        if spec is None or spec.arch != WORLD_MODEL:
            spec = named_model(WORLD_ENTRY, pretrained if model is None else None)
        return create_victim(spec, progress=False)
    return load


def validate(target: str, victim_loader: Callable[[], object], options: dict | None = None) -> list[Check]:
    """Every check of the plugins ``target`` names; ``victim_loader`` gives the world victim
    (loaded only if a static check passed). ``options`` set parameters for the runs on the
    world (e.g. ``mlm: world`` for a text attack, a smaller iteration budget)."""
    options = options or {}
    results: list[Check] = []
    world: World | None = None
    for kind, name in plugins_of(target):
        static = static_checks(kind, name)
        results += static
        if any(check.status == "fail" for check in static):
            results.append(Check(f"{kind[:-1]} {name}", "runs on the world", "n/a", "a static check failed"))
            continue
        world = world or World(victim_loader())
        checks = (attack_checks if kind == "attacks" else defense_checks)(name, world, options)
        results += _guarded(f"{kind[:-1]} {name}", checks)
    return results


def _guarded(label: str, checks: Iterator[Check]) -> list[Check]:
    """The checks ``checks`` yields; an error before the first (building, preparing or running
    the plugin at all) is one failed check."""
    found = []
    try:
        for check in checks:
            found.append(check)
    except Exception as exc:
        found.append(Check(label, "runs on the world", "fail", f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
    return found
