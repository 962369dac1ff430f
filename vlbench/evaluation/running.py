"""Running an attack inside a task, and checking what it returns: images in [0, 1] of the
input's shape, as many texts as it was given, reproducible outputs (a probe runs a few
samples twice from one generator state), and the memo that lets a deterministic attack run
once per victim and problem."""

from __future__ import annotations

import torch

from vlbench.api import Attack, ImageAttack, MultimodalAttack, TextAttack
from vlbench.data.datasets import EvalData
from vlbench.evaluation.context import EvalContext, EvalMemo, image_batches, sample_noise
from vlbench.models.victim import Victim
from vlbench.store.files import tensor_fingerprint


def perturb_texts(attack: TextAttack, victim: Victim, objective, generator: torch.Generator,
                  memo: EvalMemo | None = None) -> list[str]:
    """Run a text attack and check its output; with ``memo``, a deterministic attack run
    before on the same objective returns its earlier texts (and records its counts again)."""
    def compute() -> list[str]:
        adversarial = attack.perturb_texts(victim, objective, generator)
        if len(adversarial) != len(objective.texts) or not all(isinstance(t, str) for t in adversarial):
            raise RuntimeError(f"attack {attack.name} returned {len(adversarial)} texts for {len(objective.texts)}")
        return list(adversarial)

    if memo is None:
        return compute()
    adversarial, made = memo.attack(attack, objective, "", lambda: _recorded(attack, compute))
    _record(attack, *made)
    return list(adversarial)


def perturb_images(attack: ImageAttack, victim: Victim, images: torch.Tensor, objective,
                   generator: torch.Generator, memo: EvalMemo | None = None) -> torch.Tensor:
    """Run an image attack and check its output; with ``memo``, a deterministic attack run
    before on the same images and objective (per-sample noise included) returns its earlier
    images."""
    def compute() -> torch.Tensor:
        with torch.enable_grad():
            adversarial = attack.perturb_images(victim, images, objective, generator).detach()
        _check_adversarial(attack, images, adversarial)
        return adversarial

    if memo is None or getattr(objective, "noise", None) is None:
        return compute()

    adversarial, made = memo.attack(attack, objective, tensor_fingerprint({"images": images}),
                                    lambda: _recorded(attack, compute))
    _record(attack, *made)
    return adversarial


def _recorded(attack: Attack, compute):
    """``(compute(), what it recorded)``: the notes, adjustments and counts a computation
    makes are part of its result, so a cell that reuses it records them as its own."""
    earlier = attack.take_notes(), attack.take_adjustments(), attack.take_counts()
    result = compute()
    made = attack.take_notes(), attack.take_adjustments(), attack.take_counts()
    _record(attack, *earlier)
    return result, made


def _record(attack: Attack, notes: list[str], adjustments: list[str], counts: dict[str, int]) -> None:
    for message in notes:
        attack.note(message)
    for message in adjustments:
        attack.adjust(message)
    for name, n in counts.items():
        attack.count(name, n)


def attack_texts(attack: TextAttack, ctx: EvalContext, objective, generator) -> list[str]:
    return perturb_texts(attack, ctx.victim, objective, generator, ctx.memo)


def run_multimodal(ctx: EvalContext, data: EvalData, indices: list[int], attack: MultimodalAttack,
                   problem, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The three stages on ``problem`` (the task's
    :class:`~vlbench.evaluation.objectives.MultimodalProblem`); returns adversarial image
    embeddings, text embeddings and texts."""
    texts = attack.attack_texts(problem, generator)
    if len(texts) != len(problem.texts):
        raise RuntimeError(f"attack {attack.name} returned {len(texts)} texts for {len(problem.texts)}")
    text_embeddings = ctx.memo.embed(texts)
    embeddings, start = [], 0
    for images, _ in image_batches(data, indices, ctx.batch_size, f"{attack.name} {data.name}", ctx.progress,
                                   ctx.loaders):
        rows = torch.arange(start, start + len(images))
        start += len(images)
        images = images.to(ctx.victim.device)
        with torch.enable_grad():
            adversarial = attack.attack_images(problem, rows, images, text_embeddings, generator).detach()
        _check_adversarial(attack, images, adversarial)
        with torch.no_grad():
            embeddings.append(ctx.victim.encode_image(adversarial).cpu())
    image_embeddings = torch.cat(embeddings)
    final = attack.final_texts(problem, texts, image_embeddings, generator)
    if len(final) != len(problem.texts):
        raise RuntimeError(f"attack {attack.name} returned {len(final)} final texts for {len(problem.texts)}")
    for name, n in problem.stage_counts.items():  # what its stages' attacks counted
        attack.count(name, n)
    problem.stage_counts.clear()
    return image_embeddings, ctx.memo.embed(final).cpu(), final


def _check_adversarial(attack: Attack, clean: torch.Tensor, adversarial: torch.Tensor) -> None:
    # A plugin bug must not become a leaderboard number.
    if adversarial.shape != clean.shape or not torch.isfinite(adversarial).all():
        raise RuntimeError(f"attack {attack.name} returned images of shape {tuple(adversarial.shape)} "
                           f"or non-finite pixels; expected {tuple(clean.shape)}")
    if adversarial.min() < 0 or adversarial.max() > 1:
        raise RuntimeError(f"attack {attack.name} returned pixels outside [0, 1]")


def adversarial_embeddings(ctx: EvalContext, data: EvalData, indices: list[int], attack: ImageAttack,
                            make_objective, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of attacked images and per-sample success, batch by batch."""
    victim = ctx.victim
    embeddings, correct = [], []
    noise = sample_noise(ctx, data, indices)
    desc = f"{attack.name} {data.name}"
    for batch, (images, targets) in enumerate(image_batches(data, indices, ctx.batch_size, desc, ctx.progress,
                                                                       ctx.loaders)):
        images, targets = images.to(victim.device), targets.to(victim.device)
        objective = make_objective(images, targets)
        start = batch * ctx.batch_size
        objective.noise = noise.subset(torch.arange(start, start + len(images)))
        if batch == 0:
            _probe_determinism(attack, victim, images, objective, generator)
        adversarial = perturb_images(attack, victim, images, objective, generator, ctx.memo)
        with torch.no_grad():
            embeddings.append(victim.encode_image(adversarial).cpu())
            correct.append(objective.correct(adversarial).cpu())
    return torch.cat(embeddings), torch.cat(correct)


def _probe_determinism(attack: ImageAttack, victim: Victim, images: torch.Tensor, objective,
                       generator: torch.Generator, size: int = 4) -> None:
    """Run the attack twice on a few samples from the same generator state; differing outputs
    mean results cannot be reproduced (AutoAttack's randomness check)."""
    rows = torch.arange(min(size, len(images)), device=images.device)
    state = generator.get_state()
    outputs = []
    with torch.enable_grad():
        for _ in range(2):
            probe = torch.Generator().set_state(state)
            outputs.append(attack.perturb_images(victim, images[rows], objective.subset(rows), probe).detach())
    if not torch.equal(*outputs):
        attack.note("non-deterministic outputs: the same inputs and seed gave different adversarial images")
