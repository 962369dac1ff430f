"""The training loop defenses share: AdamW with linear warmup and cosine decay, seeded,
with a progress bar (loss and throughput), a declared set of trainable parameters,
safetensors checkpoints every N steps, exact resume, and a stop on a non-finite loss.

A defense supplies ``loss_at(step) -> scalar tensor`` and the random generators its batches
and training attacks draw from; everything else (which parameters move, the schedule,
checkpoints, determinism) is decided here so that defenses differ only in their objective.
A run resumed from its last checkpoint ends with the same weights as an uninterrupted one
(same seed, CPU): the checkpoint holds the weights, the optimizer's moments and the
generators' states.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .api import Defense, check_range
from .cost import Work
from .errors import UserError
from .io import atomic_save_tensors
from .precision import fused_optimizer_kwargs, grad_scaler
from .progress import progress as progress_bar


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class Schedule:
    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup: int = 0
    optimizer: str = "adamw"   # "sgd": momentum 0.9 (TeCoA); "adam": CLIP's betas, coupled L2 (MMCoA)

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        fused = fused_optimizer_kwargs(params[0].device) if params else {}
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=self.weight_decay,
                                    **fused)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, **fused)
        raise UserError(f"unknown optimizer {self.optimizer!r}", f"use one of {OPTIMIZERS}")

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to zero (open_clip's ``cosine_lr``)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) * self.lr


def freeze_all_but(model: nn.Module, trainable: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Make exactly ``trainable`` require gradients; return them."""
    keep = {id(p) for p in trainable}
    params = []
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in keep)
        if id(parameter) in keep:
            params.append(parameter)
    return params


# -- checkpoints ------------------------------------------------------------------------
_CHECKPOINT = re.compile(r"step-(\d+)\.safetensors$")


def _checkpoint_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    for name, generator in generators.items():
        tensors[f"rng.{name}"] = generator.get_state()
    return tensors


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             generators: dict[str, torch.Generator]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    state["state"] = moments
    optimizer.load_state_dict(state)
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])


def latest_checkpoint(folder: Path | None) -> tuple[int, Path] | None:
    """The newest readable ``step-N.safetensors`` in ``folder``."""
    from safetensors import safe_open

    if folder is None or not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.search(p.name))),
                   reverse=True)
    for step, path in found:
        try:
            with safe_open(str(path), framework="pt"):
                return step, path
        except Exception:  # a damaged file is skipped; an older one still resumes
            continue
    return None


@dataclass
class TrainingRun:
    """Where and how a defense's training runs, decided by the runner (not part of the
    defense's identity: none of it changes the weights)."""

    progress: bool = True
    workdir: Path | None = None
    checkpoint_every: int = 100
    label: str | None = None   # the defense's label in the run, for progress lines


def run_training(model: nn.Module, trainable: Iterable[nn.Parameter], schedule: Schedule,
                 loss_at: Callable[[int], torch.Tensor], desc: str = "train", progress: bool = True,
                 generators: dict[str, torch.Generator] | None = None, checkpoint_dir: Path | None = None,
                 checkpoint_every: int = 0, batch_size: int | None = None, precision: str = "fp32") -> dict:
    """Optimise ``loss_at`` over ``schedule.steps`` steps; return a summary for the record.

    With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps and at the
    end, and a run finding checkpoints there resumes from the newest one. ``precision`` is
    the one the loss's forward passes run in (the victim's); fp16 scales the loss.
    """
    generators = generators or {}
    params = freeze_all_but(model, trainable)
    optimizer = schedule.make_optimizer(params)
    scaler = grad_scaler(precision, params[0].device) if params else None
    first_step, resumed_from, last_good = 0, None, None
    found = latest_checkpoint(checkpoint_dir)
    if found is not None:
        step, path = found
        _restore(path, model, optimizer, generators)
        first_step, resumed_from, last_good = step + 1, str(path), path

    def save(step: int) -> Path:
        path = checkpoint_dir / f"step-{step}.safetensors"
        atomic_save_tensors(path, _checkpoint_tensors(model, optimizer, generators), metadata={"step": str(step)})
        for older in checkpoint_dir.glob("step-*.safetensors"):
            if older != path:
                older.unlink(missing_ok=True)
        return path

    model.train()
    started = time.perf_counter()
    losses = []
    bar = progress_bar(range(first_step, schedule.steps), desc=desc, enabled=progress, leave=False,
                       initial=first_step, total=schedule.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        loss = loss_at(step)
        if not torch.isfinite(loss):
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
            raise TrainingDiverged(f"{desc}: the loss became {loss.item()} at step {step} ({where})",
                                   "lower the learning rate, or check the defense's inputs")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses.append(loss.item())
        elapsed = max(time.perf_counter() - started, 1e-9)
        postfix = {"loss": f"{loss.item():.3f}"}
        if batch_size:
            postfix["img/s"] = f"{batch_size * len(losses) / elapsed:.0f}"
        bar.set_postfix(postfix)
        if checkpoint_dir is not None and (
                (checkpoint_every and (step + 1) % checkpoint_every == 0) or step == schedule.steps - 1):
            last_good = save(step)
    model.eval()
    model.requires_grad_(False)
    return {"steps": schedule.steps, "resumed_from": resumed_from,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - started, 2)}


@dataclass
class TrainingBatch:
    """One training batch: images with their class labels and class-prompt embeddings
    (classification datasets), or with one ground-truth caption each (retrieval datasets)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_weights: torch.Tensor | None = None
    classnames: list[str] | None = None
    captions: list[str] | None = None


class TrainingBatches:
    """Seeded batches from the training splits of the named datasets.

    Step ``k`` draws its batch from dataset ``k mod D`` (round robin), so several tasks over
    the same images (the world's attributes) or several real datasets share one run. Each
    classification dataset's class-prompt embeddings are computed once with the victim's text
    encoder and kept frozen, as in TeCoA's fine-tuning (Mao et al., ICLR 2023, §3); a
    retrieval dataset (only where ``tasks`` allows it) pairs each drawn image with one of its
    ground-truth captions, drawn uniformly.
    """

    def __init__(self, victim, names: list[str], split: str, batch_size: int, seed: int,
                 tasks: tuple[str, ...] = ("classification",)):
        from .datasets import load_dataset
        from .tasks import classifier_weights

        self.datasets = [load_dataset(name, split=split) for name in names]
        for data in self.datasets:
            if data.task not in tasks:
                raise UserError(f"training on {data.name} needs {' or '.join(tasks)} data, it is {data.task}",
                                f"name {' or '.join(tasks)} datasets in train_datasets")
        with torch.no_grad():
            self.weights = [classifier_weights(victim, d.classnames, d.templates) if d.task == "classification"
                            else None for d in self.datasets]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.device = victim.device

    def batch(self, step: int) -> TrainingBatch:
        which = step % len(self.datasets)
        data = self.datasets[which]
        picks = torch.randint(len(data), (self.batch_size,), generator=self.generator).tolist()
        items = [data.images[i] for i in picks]
        images = torch.stack([item[0] for item in items]).to(self.device)
        if data.task == "retrieval":
            choices = torch.randint(1 << 30, (len(picks),), generator=self.generator).tolist()
            captions = [data.captions[i][c % len(data.captions[i])] for i, c in zip(picks, choices)]
            return TrainingBatch(images, captions=captions)
        labels = torch.as_tensor([int(item[1]) for item in items], device=self.device)
        return TrainingBatch(images, labels, self.weights[which], data.classnames)


@dataclass
class TrainingParams:
    """The parameters every training defense has; defenses override the defaults with their
    paper's values (defaults here: FARE's ImageNet recipe, Schlarmann et al., ICML 2024)."""

    train_datasets: list = field(default_factory=lambda: ["imagenet"])
    split: str = "train"
    steps: int = 20000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup: int = 1400
    optimizer: str = "adamw"
    seed: int = 0


class TrainingDefense(Defense):
    """A defense trained by :func:`run_training` on classification training splits."""

    Params = TrainingParams
    #: the tasks of the datasets it can train on
    training_tasks: tuple[str, ...] = ("classification",)

    def validate(self) -> None:
        owner = f"defense {self.name}"
        p = self.params
        check_range(owner, "steps", p.steps, 1, 100_000_000)
        check_range(owner, "batch_size", p.batch_size, 1, 1_000_000)
        check_range(owner, "lr", p.lr, 0, 10)
        check_range(owner, "warmup", p.warmup, 0, 100_000_000)
        if p.optimizer not in OPTIMIZERS:
            raise UserError(f"{owner} optimizer {p.optimizer!r} is unknown", f"use one of {OPTIMIZERS}")
        if not p.train_datasets:
            raise UserError(f"{owner} has no train_datasets", "name at least one classification dataset")

    def training_data(self) -> dict:
        return {"datasets": list(self.params.train_datasets), "split": self.params.split}

    def check_training_data(self) -> None:
        from .datasets import get_spec, load_dataset

        for name in self.params.train_datasets:
            task = get_spec(name).task
            if task not in self.training_tasks:
                raise UserError(f"defense {self.name} trains on {' or '.join(self.training_tasks)} data; "
                                f"{name} is a {task} dataset", "name other datasets in train_datasets")
            load_dataset(name, split=self.params.split)  # its files are there, or a one-line error

    def work(self) -> Work:
        """One training pass of the image tower per sample and step (defenses that train
        more add to it)."""
        return Work(image_steps=self.params.steps * self.params.batch_size)

    def schedule(self) -> Schedule:
        p = self.params
        return Schedule(steps=p.steps, lr=p.lr, weight_decay=p.weight_decay, warmup=p.warmup, optimizer=p.optimizer)

    def batches(self, victim) -> TrainingBatches:
        p = self.params
        return TrainingBatches(victim, list(p.train_datasets), p.split, p.batch_size, p.seed, self.training_tasks)

    def train(self, victim, run: TrainingRun, trainable, loss_at, generators: dict) -> dict:
        return run_training(victim.model, trainable, self.schedule(), loss_at, desc=f"fit {run.label or self.name}",
                            progress=run.progress, generators=generators, checkpoint_dir=run.workdir,
                            checkpoint_every=run.checkpoint_every, batch_size=self.params.batch_size,
                            precision=victim.precision)


class AdversarialTrainingDefense(TrainingDefense):
    """A training defense with an L∞ image adversary (``eps``, ``attack_steps`` and
    ``attack_step_size`` in its parameters, in 1/255) and, when its parameters name one, a
    text adversary built from a registered text attack (``text_attack``, ``text_params``)."""

    def validate(self) -> None:
        from .components import build_component

        super().validate()
        owner = f"defense {self.name}"
        p = self.params
        check_range(owner, "eps", p.eps, 0, 255, "/255")
        check_range(owner, "attack_step_size", p.attack_step_size, 0, 255, "/255")
        check_range(owner, "attack_steps", p.attack_steps, 0, 10_000)
        name = getattr(p, "text_attack", None)
        self.text_attack = build_component(owner, name, p.text_params, "text") if name else None

    def prepare(self) -> None:
        if self.text_attack is not None:
            self.text_attack.prepare()

    def pending(self):
        return self.text_attack.pending() if self.text_attack is not None else []

    def work(self) -> Work | None:
        p = self.params
        work = super().work() + Work(image_grads=p.steps * p.batch_size * p.attack_steps)
        if self.text_attack is not None:
            text = self.text_attack.work("retrieval", 0, p.batch_size, 0)
            work = None if text is None else work + text * p.steps
        return work

    def text_adversary(self, victim, objective, generator: torch.Generator) -> list[str]:
        """The text attack's texts for ``objective``, found in eval mode like the image
        adversary. The towers have no dropout, so eval mode changes no value here; it lets
        PyTorch run the text tower's attention on its fused inference kernels, about twice as
        fast for the thousands of candidates a step scores."""
        with eval_mode(victim.model), torch.no_grad():
            return self.text_attack.perturb_texts(victim, objective, generator)

    def image_adversary(self, victim, images: torch.Tensor, loss_fn, generator: torch.Generator) -> torch.Tensor:
        """Adversarial images maximising ``loss_fn(x, rows)`` by L∞ PGD, found in eval mode."""
        from .perturb import linf_pgd

        p = self.params
        return in_eval_mode(victim.model, lambda: linf_pgd(images, loss_fn, p.eps / 255, p.attack_step_size / 255,
                                                          p.attack_steps, generator))


@dataclass
class ClassPromptParams(TrainingParams):
    """The class-prompt fine-tuning recipe of the TeCoA lineage (Mao et al., ICLR 2023; README:
    ImageNet, batch 256; code: SGD with momentum 0.9, no weight decay, warmup 1000, 10 epochs
    ≈ 50k steps). lr 1e-5 as TGA-ZSR reruns TeCoA: the paper's own value could not be verified
    (research/defenses.md §3)."""

    steps: int = 50000
    batch_size: int = 256
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: int = 1000
    optimizer: str = "sgd"


def in_eval_mode(model: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``compute`` (a training-time attack) with the model in eval mode, as FARE's and
    TeCoA's training loops do, so batch-norm statistics are not updated by attack steps."""
    with eval_mode(model), torch.enable_grad():
        return compute().detach()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, back in its own mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
