"""SGA: Set-level Guidance Attack on image-text retrieval.

Lu, Wang, Li, Yang, Deng, Chen, "Set-level Guidance Attack: Boosting Adversarial
Transferability of Vision-Language Pre-training Models", ICCV 2023, §3.3 and Algorithm 1
(reference ``attacker.py``; research/attacks_nn.md B.3). Three stages:

1. each caption is attacked with BERT-Attack (1 word), guided by its clean image: the
   substitute minimising the cosine to the image embedding wins;
2. the image is attacked with L∞ PGD (ε = 2/255, 10 steps, step 0.5/255, uniform start),
   supervised by the *set* of all its adversarial captions and a *scale set*: the current
   image plus, for each scale s ∈ {0.5, 0.75, 1.25, 1.5}, a copy with Gaussian noise
   N(0, 0.05²) resized by s (bicubic) and back; the loss summed over the copies is
   ``−Σ_{j ∈ captions(i)} ⟨f(copy_i), g(t'_j)⟩``;
3. the *original* captions are attacked again, now guided by the adversarial images.

The scale copies are made in the dataset's pixel space (vlbench's victims resize inside),
where the reference resizes at the model's input resolution.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlbench.api import attacks, check_range

from ._text_then_image import TextThenImagePGDAttack


def rescaled_copy(images: torch.Tensor, scale: float, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """A noisy copy resized by ``scale`` and back to the original size, in [0, 1]."""
    noise = torch.randn(images.shape, generator=generator).to(images.device) * noise_std
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = F.interpolate((images + noise).clamp(0, 1), size=size, mode="bicubic", align_corners=False)
    return F.interpolate(resized.clamp(0, 1), size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


@attacks.register("sga")
class SGA(TextThenImagePGDAttack):
    """Image-guided text attack, set- and scale-guided image attack, then the text again."""

    paper = "Lu et al., ICCV 2023 (Set-level Guidance Attack)"
    description = "text (image-guided) → image (caption set + scale set) → text (adversarial-image-guided)"
    version = "1"

    @dataclass
    class Params(TextThenImagePGDAttack.Params):
        scales: list = field(default_factory=lambda: [0.5, 0.75, 1.25, 1.5])
        noise_std: float = 0.05

    text_stages = 2

    def image_copies(self) -> int:
        return 1 + len(self.params.scales)

    def validate(self) -> None:
        super().validate()
        for scale in self.params.scales:
            check_range(f"attack {self.name}", "scales", float(scale), 0.05, 20)

    def attack_texts(self, problem, generator):
        guided = problem.image_guided_objective(problem.clean_image_embeddings)
        return problem.perturb_texts(self.text, guided, generator)

    def image_loss(self, problem, rows, text_embeddings, generator):
        own = problem.captions_of(rows).float().to(text_embeddings.device)

        def loss(x, subset):
            copies = [x] + [rescaled_copy(x, s, self.params.noise_std, generator) for s in self.params.scales]
            total = 0
            for copy in copies:
                similarity = problem.victim.encode_image(copy) @ text_embeddings.T
                total = total - (own[subset] * similarity).sum(dim=1)
            return total

        return loss

    def final_texts(self, problem, texts, image_embeddings, generator):
        guided = problem.image_guided_objective(image_embeddings)
        return problem.perturb_texts(self.text, guided, generator)
