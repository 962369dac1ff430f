"""The metrics of the tasks: Recall@K both ways with several captions per image (an image
query is correct if any of its captions is in the top K, a caption query if its image is),
the retrieval attack literature's two success rates, and the words a text attack changed."""

from __future__ import annotations

import torch

RECALL_KS = (1, 5, 10)


def first_positive_ranks(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                         text_to_image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per query, the 1-based rank of its first positive: ``{"i2t": [images], "t2i": [texts]}``.

    Equal similarities rank in gallery order (as a stable sort would), so every rank, and
    every Recall@K read from the ranks, is a deterministic function of the embeddings."""
    similarity = image_embeddings @ text_embeddings.T  # [images, texts]
    n_images, n_texts = similarity.shape
    owner = text_to_image.to(similarity.device)
    images = torch.arange(n_images, device=similarity.device)
    texts = torch.arange(n_texts, device=similarity.device)
    positive = owner[None, :] == images[:, None]
    best = similarity.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    first = texts.masked_fill(~(positive & (similarity == best)), n_texts).min(dim=1, keepdim=True).values
    i2t = 1 + (similarity > best).sum(dim=1) + ((similarity == best) & (texts[None, :] < first)).sum(dim=1)
    own = similarity[owner, texts][:, None]  # [texts, 1]
    columns = similarity.T
    t2i = 1 + (columns > own).sum(dim=1) + ((columns == own) & (images[None, :] < owner[:, None])).sum(dim=1)
    return {"i2t": i2t.cpu(), "t2i": t2i.cpu()}


def retrieval_hits(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                   text_to_image: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, torch.Tensor]:
    """Per query, is it retrieved within the top K? ``{"i2t_R@K": [images], "t2i_R@K": [texts]}``."""
    return hits_from_ranks(first_positive_ranks(image_embeddings, text_embeddings, text_to_image), ks)


def hits_from_ranks(ranks: dict[str, torch.Tensor], ks: tuple[int, ...] = RECALL_KS) -> dict[str, torch.Tensor]:
    return {f"{direction}_R@{k}": ranks[direction] <= k for k in ks for direction in ("i2t", "t2i")}


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
