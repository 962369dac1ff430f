"""The metrics of the tasks: Recall@K both ways with several captions per image (an image
query is correct if any of its captions is in the top K, a caption query if its image is),
the retrieval attack literature's two success rates, and the words a text attack changed."""

from __future__ import annotations

import torch

RECALL_KS = (1, 5, 10)


def retrieval_hits(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                   text_to_image: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, torch.Tensor]:
    """Per query, is it retrieved within the top K? ``{"i2t_R@K": [images], "t2i_R@K": [texts]}``."""
    similarity = image_embeddings @ text_embeddings.T  # [images, texts]
    n_images, n_texts = similarity.shape
    top = max(ks)
    image_ranked = similarity.topk(min(top, n_texts), dim=1).indices          # [images, k]
    text_ranked = similarity.T.topk(min(top, n_images), dim=1).indices        # [texts, k]
    image_hits = text_to_image[image_ranked] == torch.arange(n_images)[:, None]
    text_hits = text_ranked == text_to_image[:, None]
    hits = {}
    for k in ks:
        hits[f"i2t_R@{k}"] = image_hits[:, :k].any(dim=1)
        hits[f"t2i_R@{k}"] = text_hits[:, :k].any(dim=1)
    return hits


def recall_at_k(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                text_to_image: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Image→text and text→image Recall@K in percent (several captions per image)."""
    hits = retrieval_hits(image_embeddings, text_embeddings, text_to_image, ks)
    return {name: 100.0 * hit.float().mean().item() for name, hit in hits.items()}


def attack_success_rates(clean: dict[str, torch.Tensor], attacked: dict[str, torch.Tensor]) -> dict[str, float]:
    """Both success-rate definitions of the retrieval attack literature, named apart:

    - ``asr_drop_<R@K>`` (Co-Attack): clean R@K minus attacked R@K, in points;
    - ``asr_relative_<R@K>`` (SGA's ``itm_eval``): the share of queries correct before the
      attack that are wrong after it, |C_clean \\ C_adv| / |C_clean| × 100, ignoring queries the
      attack makes correct.
    """
    rates = {}
    for name, before in clean.items():
        after = attacked[name]
        rates[f"asr_drop_{name}"] = 100.0 * (before.float().mean() - after.float().mean()).item()
        rates[f"asr_relative_{name}"] = 100.0 * (before & ~after).sum().item() / max(1, int(before.sum()))
    return rates


def words_changed(clean: list[str], adversarial: list[str]) -> float:
    from vlbench.evaluation.words import changed_words

    return float(max((changed_words(a, b) for a, b in zip(clean, adversarial)), default=0))
