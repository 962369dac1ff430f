"""Training objectives shared by defenses (the formulas; defenses say which they use).

- :func:`class_prompt_loss` — TeCoA (Mao et al., ICLR 2023, §3): cross-entropy of
  ``s · cos(f(x), w_c)`` over the class-prompt embeddings ``w_c``.
- :func:`clip_loss` — the symmetric in-batch CLIP loss (Radford et al., ICML 2021, Fig. 3),
  summed over both directions: ``CE(s·F Gᵀ, I) + CE(s·G Fᵀ, I)`` with L2-normalised F, G;
  ``positives`` optionally marks several matching columns per row (multi-positive InfoNCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_prompt_loss(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor,
                      logit_scale: torch.Tensor | float, reduction: str = "mean",
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``s · cos(f(x), w_c)`` over the classes; ``label_smoothing`` ε mixes
    the one-hot target with the uniform one, (1 - ε) δ_{k,y} + ε / K (Szegedy et al., CVPR 2016, §7)."""
    logits = logit_scale * F.normalize(image_embeddings, dim=-1) @ F.normalize(class_embeddings, dim=-1).T
    return F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing)


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)).mean()


def clip_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor | float,
              positives: torch.Tensor | None = None) -> torch.Tensor:
    images = F.normalize(image_embeddings, dim=-1)
    texts = F.normalize(text_embeddings, dim=-1)
    logits = logit_scale * images @ texts.T
    if positives is None:
        targets = torch.arange(len(logits), device=logits.device)
        return F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)
    return _multi_positive_ce(logits, positives) + _multi_positive_ce(logits.T, positives.T)

