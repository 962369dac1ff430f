"""Reading what a result cell says about the model it evaluated, whatever revision wrote it.

Cells written since the model card record their row's base model in ``config["model"]``: the
model entry, its architecture, where its weights came from and their fingerprint
(:func:`vlbench.models.card.identity`). Older cells named an open_clip architecture in
``config["model"]`` and the tag or checkpoint in ``config["pretrained"]``; both read as the
same mapping here, so a leaderboard can hold cells of either kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def base_model(result: dict) -> dict[str, Any]:
    """The base model of ``result``'s row: ``entry`` (the model card's name, None before the
    card), ``arch``, ``tag`` (an open_clip pretrained tag, if that is where the weights came
    from), ``source`` (where the weights came from, for people) and ``weights`` (their
    fingerprint, None when not recorded)."""
    config = result.get("config", {})
    model = config.get("model")
    if isinstance(model, dict):
        return model
    pretrained = config.get("pretrained")
    is_path = isinstance(pretrained, str) and ("/" in pretrained or Path(pretrained).suffix != "")
    source = (Path(pretrained).name if is_path else f"{pretrained} (open_clip tag)" if pretrained
              else f"pretrained by vlbench ({config.get('base')})" if config.get("base") else "not recorded")
    return {"entry": None, "arch": model, "tag": None if is_path else pretrained, "source": source,
            "weights": config.get("base") or (Path(pretrained).name if is_path else pretrained)}


def base_fingerprint(result: dict) -> str | None:
    """The fingerprint of the base weights the row's model was made from, as loaded (a hash of
    the tensors: :meth:`vlbench.models.victim.Victim.fingerprint`); None in older cells."""
    return (result.get("base") or {}).get("fingerprint")
