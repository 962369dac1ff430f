"""What a run will cost, before it starts: work counted in four kinds of operation, each
timed on this machine in a warm-up of under a second.

A plugin states its work with ``work(...)`` (attacks: per cell, from the task and the
number of images and texts; defenses: for their training) and what its ``prepare`` will
build with ``pending()``; :class:`Rates` times one batch of each operation with the run's
model architecture. The estimate is the sum of counts times rates: it ignores Python
overheads and early stopping, so it is a planning figure, and the runner prints it as one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, fields

import torch


@dataclass
class Work:
    """Operation counts, one sample each."""

    image_grads: float = 0.0     # forward + backward through the image tower, weights frozen (an attack step)
    image_steps: float = 0.0     # forward + backward through the image tower with weight gradients (training)
    text_forwards: float = 0.0   # one text encoded without gradients (scoring a candidate)
    text_steps: float = 0.0      # forward + backward through the text tower with weight gradients

    def __add__(self, other: "Work") -> "Work":
        return Work(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __mul__(self, factor: float) -> "Work":
        return Work(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    __rmul__ = __mul__


def total(works) -> Work:
    result = Work()
    for work in works:
        result = result + work
    return result


def _best_of(fn, rounds: int = 2) -> float:
    fn()  # warm: first calls allocate and pick kernels
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


@dataclass
class Rates:
    """Seconds per sample of each operation of :class:`Work`, measured on this machine."""

    image_grads: float
    image_steps: float
    text_forwards: float
    text_steps: float
    warmup_seconds: float = 0.0
    #: bytes of the model's weights, and of what autograd keeps per image for an attack step's
    #: backward pass (the activations): together what a GPU must hold for an attack
    weight_bytes: int = 0
    activation_bytes: float = 0.0

    @classmethod
    def measure(cls, victim, image_batch: int = 64, text_batch: int = 256, budget: float = 0.1) -> "Rates":
        """Time each operation on one batch of random pixels and short prompts, on a copy of
        ``victim`` (training mode updates batch-norm statistics; the original is untouched),
        and count the activations an attack step keeps. Batches shrink so that one timing
        takes about ``budget`` seconds on a large model."""
        started = time.perf_counter()
        model = copy.deepcopy(victim)
        height, width = model.image_size
        device = model.device
        model.eval().requires_grad_(False)
        probe = torch.rand(2, 3, height, width, device=device)
        per_image = _best_of(lambda: model.encode_image(probe), rounds=1) / 2
        image_batch = max(2, min(image_batch, int(budget / max(per_image, 1e-6))))
        pixels = torch.rand(image_batch, 3, height, width, device=device)
        few = model.tokenize([f"a photo of thing number {i}" for i in range(4)])
        with torch.no_grad():
            per_text = _best_of(lambda: model.encode_text(few), rounds=1) / 4
        text_batch = max(4, min(text_batch, int(budget / max(per_text, 1e-6))))
        tokens = model.tokenize([f"a photo of thing number {i}" for i in range(text_batch)])

        def image_grad():
            x = pixels.clone().requires_grad_(True)
            torch.autograd.grad(model.encode_image(x).sum(), x)

        def image_step():
            model.encode_image(pixels).sum().backward()

        def text_forward():
            with torch.no_grad():
                model.encode_text(tokens)

        def text_step():
            model.encode_text(tokens).sum().backward()

        grads = _best_of(image_grad) / image_batch
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        activations = saved_bytes(image_grad, model) / image_batch
        forwards = _best_of(text_forward) / text_batch
        model.train().requires_grad_(True)
        steps = _best_of(image_step) / image_batch
        text_steps = _best_of(text_step) / text_batch
        return cls(grads, steps, forwards, text_steps, time.perf_counter() - started, weight_bytes, activations)

    def seconds(self, work: Work) -> float:
        return sum(getattr(work, f.name) * getattr(self, f.name) for f in fields(Work))

    def attack_memory(self, batch_size: int) -> float:
        """Bytes an attack step on ``batch_size`` images holds: the weights and the saved
        activations (a floor: the allocator's caching and kernels' workspace come on top)."""
        return self.weight_bytes + batch_size * self.activation_bytes


def saved_bytes(fn, model) -> int:
    """The bytes of the tensors autograd saves for the backward pass while ``fn`` runs, each
    storage counted once and the model's weights left out (they are counted as weights)."""
    weights = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    seen: set[int] = set()
    total = 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in weights:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total
