"""Co-Attack: collaborative multimodal adversarial attack on image-text retrieval.

Zhang, Yi, Sang, "Towards Adversarial Attack on Vision-Language Pre-training Models", ACM
MM 2022, §3 and the CLIP path of the reference (``multimodalAttack.py:run_before_fusion``;
research/attacks_nn.md B.3). Text first, then the image guided by the adversarial text:

1. every caption is attacked with BERT-Attack (1 word, untargeted KL shift of its embedding);
2. the image is attacked with L∞ PGD (ε = 2/255, 10 iterations, step 0.25/255, sign steps,
   projection to the ball and to [0,1]) ascending
   ``KL(softmax(f(x)) ‖ softmax(f(x+δ))) + α · KL(softmax(g(t')) ‖ softmax(f(x+δ)))``, α = 3,
   with f, g the normalised image and text embeddings: the adversarial image moves away
   from its clean embedding and from its adversarial caption.

Where the reference attacks every (image, caption) pair separately and keeps the last
adversarial image per image, vlbench attacks each image once with the α-term averaged over
all of its adversarial captions, so an image has one well-defined adversarial version; and it
starts PGD uniformly in [−ε, ε] (the reference's start is one-sided, [0, ε)).
"""

from dataclasses import dataclass

import torch.nn.functional as F

from vlbench.api import attacks

from ._text_then_image import TextThenImagePGDAttack


@attacks.register("co-attack")
class CoAttack(TextThenImagePGDAttack):
    """BERT-Attack on captions, then image PGD away from the clean image and the adversarial text."""

    paper = "Zhang, Yi, Sang, ACM MM 2022 (Co-Attack)"
    description = "text then image: PGD pushed from the clean image and the adversarial caption"
    version = "1"

    @dataclass
    class Params(TextThenImagePGDAttack.Params):
        step_size: float = 0.25   # in 1/255 (1.25·ε/10)
        alpha: float = 3.0

    def attack_texts(self, problem, generator):
        return problem.perturb_texts(self.text, problem.embedding_shift_objective(), generator)

    def image_loss(self, problem, rows, text_embeddings, generator):
        device = text_embeddings.device
        clean = F.softmax(problem.clean_image_embeddings[rows].to(device), dim=-1)
        own = problem.captions_of(rows).float().to(device)
        own = own / own.sum(dim=1, keepdim=True).clamp_min(1)
        text_probs = F.softmax(text_embeddings, dim=-1)
        text_entropy_term = (text_probs * text_probs.clamp_min(1e-12).log()).sum(dim=1)

        def loss(x, subset):
            log_q = F.log_softmax(problem.victim.encode_image(x), dim=-1)
            away_from_clean = (clean[subset] * (clean[subset].clamp_min(1e-12).log() - log_q)).sum(dim=1)
            # mean over the image's captions of KL(p_t ‖ q) = Σ p_t log p_t − Σ p_t log q
            weights = own[subset]
            away_from_text = weights @ text_entropy_term - ((weights @ text_probs) * log_q).sum(dim=1)
            return away_from_clean + self.params.alpha * away_from_text

        return loss
