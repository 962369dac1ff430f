"""Clean fine-tuning: the "FT w/o attack" baseline of the TeCoA lineage.

Objective (the TeCoA loss of Mao et al., ICLR 2023, §3, with the perturbation set to zero,
as ``finetuning.py --VPbaseline`` does; research/defenses.md §2):

    L(θ) = E_(x,y) [ CE( s · cos(f_θ(x), w_c)_{c=1..C}, y ) ],
    w_c = normalize( mean_t normalize(g(template_t(c))) ),

where ``f_θ`` is the image encoder being fine-tuned, ``g`` the frozen text encoder, ``s`` the
(frozen) logit scale and ``w_c`` the class-prompt embeddings of the training dataset, computed
once from the base model. Only the image encoder trains. This keeps ``vanilla`` matched to
TeCoA in everything except the attack, so the two differ by adversarial training alone.
Optimiser: AdamW with warmup and cosine decay (the choice of FARE and TGA-ZSR; TeCoA's code
uses SGD). Several training datasets take turns step by step.
"""

from dataclasses import dataclass, field

import torch.nn.functional as F

from vlbench.api import Defense, check_range, defenses
from vlbench.train import ClassificationBatches, Schedule, run_training

WORLD_TASKS = ["world-shape", "world-colour", "world-size", "world-position", "world-texture"]


@defenses.register("vanilla")
class VanillaFineTuning(Defense):
    """Clean fine-tuning of the image encoder on class-prompt cross-entropy."""

    paper = "clean fine-tuning baseline (TeCoA objective with no attack; Mao et al., ICLR 2023)"
    description = "clean fine-tuning of the image encoder against frozen class prompts"

    @dataclass
    class Params:
        train_datasets: list = field(default_factory=lambda: list(WORLD_TASKS))
        split: str = "train"
        steps: int = 300
        batch_size: int = 128
        lr: float = 1e-4
        weight_decay: float = 1e-4
        warmup: int = 30
        seed: int = 0

    def validate(self) -> None:
        owner = f"defense {self.name}"
        check_range(owner, "steps", self.params.steps, 1, 10_000_000)
        check_range(owner, "batch_size", self.params.batch_size, 1, 1_000_000)
        check_range(owner, "lr", self.params.lr, 0, 1)

    def training_data(self) -> dict:
        return {"datasets": list(self.params.train_datasets), "split": self.params.split}

    def fit(self, victim, run) -> dict:
        p = self.params
        batches = ClassificationBatches(victim, list(p.train_datasets), p.split, p.batch_size, p.seed)

        def loss_at(step: int):
            images, labels, weights = batches.batch(step)
            logits = victim.logit_scale.detach() * victim.encode_image(images) @ weights.T
            return F.cross_entropy(logits, labels)

        schedule = Schedule(steps=p.steps, lr=p.lr, weight_decay=p.weight_decay, warmup=p.warmup)
        return run_training(victim.model, victim.model.visual.parameters(), schedule, loss_at,
                            desc=f"fit {self.name}", progress=run.progress,
                            generators={"batches": batches.generator}, checkpoint_dir=run.workdir,
                            checkpoint_every=run.checkpoint_every, batch_size=p.batch_size)
