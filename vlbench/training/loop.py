"""The one training loop, which every defense, the world CLIP's pretraining and the world's
masked LM use: AdamW with linear warmup and cosine decay by default, seeded,
with a progress bar (loss and throughput), a declared set of trainable parameters,
safetensors checkpoints every N steps, exact resume, and a stop on a non-finite loss.

A caller supplies ``loss_at(step) -> scalar tensor`` and the random generators its batches
and training attacks draw from; everything else (which parameters move, the schedule,
checkpoints, determinism) is decided here so that defenses differ only in their objective.
Pretraining recipes that need their own optimizer (parameter groups), per-group learning
rates or a step hook (CLIP's temperature cap) pass them in; the loop stays the same.
A run resumed from its last checkpoint ends with the same weights as an uninterrupted one
(same seed, CPU): the checkpoint holds the weights, the optimizer's moments and the
generators' states.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from vlbench.data.loading import Loading
from vlbench.errors import UserError
from vlbench.models.precision import fused_optimizer_kwargs, grad_scaler
from vlbench.monitor.progress import progress as progress_bar
from vlbench.store.files import atomic_save_tensors


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
    loading: Loading = field(default_factory=Loading)   # how training images are read


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, scaler=None) -> None:
    """One update from ``loss``: gradients cleared, backward (scaled for fp16), step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def fit(model: nn.Module, trainable: Iterable[nn.Parameter], schedule: Schedule,
                 loss_at: Callable[[int], torch.Tensor], desc: str = "train", progress: bool = True,
                 generators: dict[str, torch.Generator] | None = None, checkpoint_dir: Path | None = None,
                 checkpoint_every: int = 0, batch_size: int | None = None, precision: str = "fp32",
                 optimizer: torch.optim.Optimizer | None = None,
                 lr_at: Callable[[int, dict], float] | None = None,
                 after_step: Callable[[int], None] | None = None) -> dict:
    """Optimise ``loss_at`` over ``schedule.steps`` steps; return a summary for the record.

    With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps and at the
    end, and a run finding checkpoints there resumes from the newest one. ``precision`` is
    the one the loss's forward passes run in (the victim's); fp16 scales the loss.
    ``optimizer`` (over ``trainable``) replaces the schedule's; ``lr_at(step, group)`` sets
    each parameter group's learning rate (default: the schedule's); ``after_step(step)`` runs
    after every update.
    """
    generators = generators or {}
    params = freeze_all_but(model, trainable)
    optimizer = optimizer or schedule.make_optimizer(params)
    lr_at = lr_at or (lambda step, group: schedule.lr_at(step))
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
            group["lr"] = lr_at(step, group)
        loss = loss_at(step)
        if not torch.isfinite(loss):
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
            raise TrainingDiverged(f"{desc}: the loss became {loss.item()} at step {step} ({where})",
                                   "lower the learning rate, or check the defense's inputs")
        optimizer_step(optimizer, loss, scaler)
        if after_step is not None:
            after_step(step)
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
