"""MMCoA: multimodal contrastive adversarial training of both encoders.

Zhou, Bai, Zhao, Chen, "Revisiting the Adversarial Robustness of Vision Language Models: a
Multimodal Perspective", arXiv 2404.19287, §3 (``MMCoA.py`` l.343-376, ``--attack_domain
both1``; research/defenses.md §5). For a batch of images x_i with captions
t_i = "This is a photo of a {class(y_i)}":

    L = λ_txt · [CE(S(x, t'), I) + CE(S(x, t')ᵀ, I)] + λ_img · [CE(S(x', t), I) + CE(S(x', t)ᵀ, I)],
    S(u, v)_jk = exp(logit_scale) · cos(f(u_j), g(v_k)),  λ_txt = λ_img = 0.5,

i.e. half the symmetric in-batch CLIP loss (both directions summed, as the code does) between
clean images and BERT-Attack-perturbed captions t', half between PGD-perturbed images x' and
clean captions. t' is BERT-Attack with a 1-word budget on the untargeted KL shift of the
caption embedding (Co-Attack's ``BertAttack``); x' is TeCoA's PGD against all class prompts
(ε = 1/255, 10 steps, step 1/255). Both encoders and the logit scale train. As in the code,
samples of the same class share a caption and still count as in-batch negatives. Each step
attacks each distinct caption once (captions repeat per class), with the current weights.
Recipe (``configs/Ad_cifar100_PGD.yaml``; the code builds Adam with CLIP's betas and a
coupled weight decay 0.2, no schedule): CIFAR-100, 30 epochs of batch 256, lr 1e-6.

The paper trains and evaluates on classification only. vlbench also accepts retrieval
datasets in ``train_datasets`` (round robin with the classification ones): a retrieval
batch pairs each image with one of its ground-truth captions, drawn uniformly, in place of
the class caption, and x' is PGD on the image→text in-batch contrastive loss against the
batch's clean captions, the counterpart of PGD against all class prompts. The loss L is
unchanged: it is written for any image-text pairs.
"""

from dataclasses import dataclass, field

import torch

from vlbench.api import defenses
from vlbench.evaluation.objectives import EmbeddingShiftObjective
from vlbench.monitor.cost import Work
from vlbench.training.defenses import AdversarialTrainingDefense, TrainingParams, eval_mode
from vlbench.training.losses import class_prompt_loss, clip_loss

CAPTION = "This is a photo of a {c}"


def mmcoa_loss(images, adversarial_texts, adversarial_images, texts, logit_scale,
               text_weight: float = 0.5, image_weight: float = 0.5):
    """λ_txt·CLIP(x, t') + λ_img·CLIP(x', t), CLIP summing both in-batch directions."""
    return (text_weight * clip_loss(images, adversarial_texts, logit_scale)
            + image_weight * clip_loss(adversarial_images, texts, logit_scale))


@defenses.register("mmcoa")
class MMCoA(AdversarialTrainingDefense):
    """Align adversarial images with clean texts and adversarial texts with clean images."""

    paper = "Zhou et al., arXiv 2404.19287 (MMCoA), §3"
    description = "multimodal contrastive adversarial training of both encoders (image PGD + BERT-Attack)"
    version = "1"
    training_tasks = ("classification", "retrieval")

    @dataclass
    class Params(TrainingParams):
        train_datasets: list = field(default_factory=lambda: ["cifar100"])
        steps: int = 5880             # 30 epochs of CIFAR-100 train at batch 256
        batch_size: int = 256
        lr: float = 1e-6
        weight_decay: float = 0.2
        warmup: int = 0
        optimizer: str = "adam"
        text_weight: float = 0.5      # λ_txt
        image_weight: float = 0.5     # λ_img
        eps: float = 1.0              # image attack L∞ radius, in 1/255
        attack_steps: int = 10
        attack_step_size: float = 1.0
        text_attack: str = "bert-attack"
        text_params: dict = field(default_factory=lambda: {"budget": 1})

    def work(self):
        # beyond the image adversary and the text attack: both towers train on clean and
        # adversarial inputs
        work = super().work()
        p = self.params
        return None if work is None else work + Work(image_steps=p.steps * p.batch_size,
                                                     text_steps=2 * p.steps * p.batch_size)

    def fit(self, victim, run) -> dict:
        p = self.params
        self.prepare()
        batches = self.batches(victim, run)
        attack_rng = torch.Generator().manual_seed(p.seed + 1)

        def loss_at(step: int):
            batch = batches.batch(step)
            images = batch.images
            scale = victim.logit_scale
            captions = batch.captions or [CAPTION.format(c=batch.classnames[int(y)]) for y in batch.labels]
            distinct = sorted(set(captions))
            with eval_mode(victim.model), torch.no_grad():  # no dropout: eval mode only picks faster kernels
                clean = victim.encode_texts(distinct)
            if batch.captions is None:
                targets, labels = batch.class_weights, batch.labels
            else:  # retrieval pairs: row i's caption is the i-th target
                row_of = {caption: row for row, caption in enumerate(distinct)}
                targets = clean[[row_of[c] for c in captions]]
                labels = torch.arange(len(captions), device=images.device)
            objective = EmbeddingShiftObjective(victim, distinct, clean)
            attacked = dict(zip(distinct, self.text_adversary(victim, objective, attack_rng)))

            adversarial_images = self.image_adversary(
                victim, images, lambda x, rows: class_prompt_loss(victim.encode_image(x), targets, labels[rows],
                                                                  scale.detach(), reduction="none"), attack_rng)
            clean_texts = victim.encode_text(victim.tokenize(captions))
            adversarial_texts = victim.encode_text(victim.tokenize([attacked[c] for c in captions]))
            return mmcoa_loss(victim.encode_image(images), adversarial_texts, victim.encode_image(adversarial_images),
                              clean_texts, scale, p.text_weight, p.image_weight)

        return self.fit_parameters(victim, run, victim.model.parameters(), loss_at,
                          {"attack": attack_rng})
