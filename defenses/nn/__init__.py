"""N:N: multimodal adversarial training with one-to-many augmentation.

Waseda, Tejero-de-Pablos, Echizen, "Leveraging Many-To-Many Relationships for Defending
Against Visual-Language Adversarial Attacks", arXiv 2405.18770 (later MAT / MAT+;
research/attacks_nn.md Part A). Multimodal adversarial training (MAT) on image-text pairs of a
retrieval training split — text attacked first, then the image — with the symmetric CLIP loss
on the adversarial pair:

    L(θ) = CLIP( f_θ(x'), g_θ(t') ),  t' = BERT-Attack(t | f_θ(x)),  x' = PGD(x | t'),

where CLIP sums the in-batch cross-entropies of both directions, the text attack replaces at
most one word to lower the caption's cosine to its image (SGA's image-guided scoring), and
the image attack is L∞ PGD on the image→text contrastive loss against the adversarial
captions, run in eval mode. Both encoders and the logit scale train.

With augmentation (``augment: all`` or a list of pools), each step draws every pair from
one-to-many and many-to-one pools instead of the dataset's fixed pairs: the image is the
original or one of its kept augmented images, the text one of its ground-truth captions or
kept augmented texts (see :mod:`defenses.nn.bank`: other captions, EDA rewrites, generated
captions; crops, flips, RandAugment, generated images; an alignment filter on the frozen base
model). ``augment: none`` is plain MAT.

Choices the paper leaves open (research A.5), made here: ε = 2/255 with 3 PGD steps of
1/255 (the evaluation attacks' budget, few steps for training cost), a 1-word text budget,
a uniform draw over the kept pool entries, the alignment margin 0.05 relative to each image's
best ground-truth caption. Recipe defaults: Flickr30k Karpathy train split, AdamW lr 1e-5.
"""

from dataclasses import dataclass, field

import torch

from vlbench.api import defenses
from vlbench.data.datasets import load_dataset
from vlbench.errors import UserError
from vlbench.evaluation.objectives import ImageGuidedTextObjective
from vlbench.monitor.cost import Work
from vlbench.training.defenses import AdversarialTrainingDefense, TrainingParams, eval_mode
from vlbench.training.losses import clip_loss

from .bank import BANK_REVISION, IMAGE_POOLS, TEXT_POOLS, AugmentConfig, cached_bank


def mat_loss(adversarial_images, adversarial_texts, logit_scale):
    """The symmetric in-batch CLIP loss on the adversarial pairs."""
    return clip_loss(adversarial_images, adversarial_texts, logit_scale)


@defenses.register("nn")
class NN(AdversarialTrainingDefense):
    """MAT with N:N augmentation pools (augment: none is plain MAT)."""

    paper = "Waseda et al., arXiv 2405.18770 (N:N; MAT/MAT+)"
    description = "multimodal adversarial training on image-text pairs with one-to-many augmentation"
    version = "1"
    training_tasks = ("retrieval",)

    @dataclass
    class Params(TrainingParams):
        train_datasets: list = field(default_factory=lambda: ["flickr30k"])
        steps: int = 10000
        batch_size: int = 128
        lr: float = 1e-5
        weight_decay: float = 0.2
        warmup: int = 500
        eps: float = 2.0              # image attack L∞ radius, in 1/255
        attack_steps: int = 3
        attack_step_size: float = 1.0
        text_attack: str = "bert-attack"
        text_params: dict = field(default_factory=lambda: {"budget": 1})
        augment: list = field(default_factory=lambda: ["all"])   # ["none"], ["all"] or pool names
        per_pool: int = 2
        alignment_margin: float = 0.05

    def validate(self) -> None:
        super().validate()
        owner = f"defense {self.name}"
        unknown = set(self.params.augment) - {"none", "all", *TEXT_POOLS, *IMAGE_POOLS}
        if unknown:
            raise UserError(f"{owner} has unknown augmentation pools {sorted(unknown)}",
                            f"use none, all, or pools from {TEXT_POOLS + IMAGE_POOLS}")

    def augment_config(self) -> AugmentConfig | None:
        pools = set(self.params.augment)
        if not pools or pools == {"none"}:
            return None
        chosen = TEXT_POOLS + IMAGE_POOLS if "all" in pools else tuple(pools)
        return AugmentConfig(tuple(p for p in TEXT_POOLS if p in chosen), tuple(p for p in IMAGE_POOLS if p in chosen),
                             self.params.per_pool, self.params.alignment_margin, self.params.seed)

    def training_data(self) -> dict:
        return {**super().training_data(), "augment": list(self.params.augment)}

    def config(self) -> dict:
        # The bank's revision is part of an augmented model's identity: a changed generator
        # gives new checkpoints and new result cells, never a reuse of the old ones.
        config = super().config()
        if self.augment_config() is not None:
            config["bank_revision"] = BANK_REVISION
        return config

    def work(self):
        # beyond the image adversary and the text attack: the text tower trains too
        work = super().work()
        p = self.params
        return None if work is None else work + Work(text_steps=p.steps * p.batch_size)

    def check_training_data(self) -> None:
        if len(self.params.train_datasets) != 1:
            raise UserError(f"defense {self.name} trains on one retrieval dataset", "name one in train_datasets")
        super().check_training_data()

    def fit(self, victim, run) -> dict:
        p = self.params
        data = load_dataset(p.train_datasets[0], split=p.split)
        self.prepare()
        config = self.augment_config()
        bank = None
        if config is not None:  # built with the base weights: the alignment filter's frozen model
            bank, _ = cached_bank(victim, data, config, run.progress)
            self.augmentation_stats = bank.stats
        batches = torch.Generator().manual_seed(p.seed)
        attack_rng = torch.Generator().manual_seed(p.seed + 1)

        def pick(options: int) -> int:
            return int(torch.randint(options, (1,), generator=batches))

        def draw(row: int) -> tuple[torch.Tensor, str]:
            texts = list(data.captions[row]) + (bank.texts[row] if bank else [])
            images = bank.images_of(row) if bank else torch.empty(0, dtype=torch.long)
            choice = pick(len(images) + 1)
            image = data.images[row][0] if choice == 0 else bank.images[images[choice - 1]].float() / 255
            return image, texts[pick(len(texts))]

        def loss_at(step: int):
            scale = victim.logit_scale  # read each step: it trains, and needs the trainer's grad flags
            rows = torch.randint(len(data), (p.batch_size,), generator=batches).tolist()
            pairs = [draw(row) for row in rows]
            images = torch.stack([image for image, _ in pairs]).to(victim.device)
            texts = [text for _, text in pairs]
            with torch.no_grad():
                guide = ImageGuidedTextObjective(victim, texts, victim.encode_image(images))
            adversarial_texts = self.text_adversary(victim, guide, attack_rng)
            with eval_mode(victim.model), torch.no_grad():  # the attack scored most of them already
                targets = guide.embed(adversarial_texts)

            def loss(x, rows):  # image→text contrastive loss: row i's caption is the i-th target
                logits = scale.detach() * victim.encode_image(x) @ targets.T
                return torch.nn.functional.cross_entropy(logits, rows, reduction="none")

            adversarial_images = self.image_adversary(victim, images, loss, attack_rng)
            text_embeddings = victim.encode_text(victim.tokenize(adversarial_texts))
            return mat_loss(victim.encode_image(adversarial_images), text_embeddings, scale)

        summary = self.fit_parameters(victim, run, victim.model.parameters(), loss_at,
                             {"batches": batches, "attack": attack_rng})
        if bank is not None:
            summary["augmentation"] = bank.stats
        return summary
