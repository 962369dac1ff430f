"""Constraints on the edits of word- and character-level text attacks (BERT-Attack,
DeepWordBug, and the text stages of the multimodal attacks built from them).

An unconstrained substitution attack on captions mostly swaps one attribute word for another
(``pink`` → ``blue``, ``left`` → ``right``): the perturbed text then describes a different
scene, a change of ground truth rather than an adversarial example. Morris, Lifland, Lanchantin,
Ji, Qi, "Reevaluating Adversarial Examples in Natural Language", Findings of EMNLP 2020, show
that many such "successful" word swaps do not preserve the meaning of the original and argue
for constraints that do. The parameter ``constraint`` chooses one:

- ``"auto"`` (the default): ``"meaning"`` where the objective has the dataset's parser (the
  world's tasks), ``"none"`` elsewhere (real datasets, whose texts no parser reads, and the
  text adversaries of adversarial training, which follow their papers unconstrained);
- ``"none"``: every candidate is scored, the protocol of the Co-Attack / SGA / MMCoA code
  (and of DeepWordBug's recipe, which bounds only the edit distance);
- ``"meaning"``: a candidate edit is kept only if the edited text still states what the
  original states, by the dataset's own parser (the task's ``objective.meaning``; on the
  synthetic world :func:`vlbench.world.scenes.scene_from_caption`, so an edit must leave every
  attribute a caption names as it is). A dataset without a parser cannot use it;
- ``"sentence-encoder"``: the constraint of BERT-Attack itself (Li et al., EMNLP 2020, §3:
  perturbations kept semantically close to the original by a sentence-similarity filter),
  as TextAttack's ``bert_attack_li_2020`` recipe states it: the cosine between a sentence
  encoder's embeddings of the candidate and of the *original* text must reach ``similarity``
  (research/attacks_nn.md B.2: the Universal Sentence Encoder at 0.2 over the whole text).
  ``encoder`` names a local folder of a transformers model (a sentence-transformers folder
  holds one at its top level); it is loaded from safetensors weights only, never downloaded,
  and texts are embedded by the mean of its last hidden states over their tokens.

Candidates are filtered during the search, before they are scored
(:func:`vlbench.evaluation.words.greedy_substitutions`' ``accept``): a rejected edit is never
chosen, and a word whose candidates are all rejected is passed over for the next one. Every
constrained cell counts the candidate edits the constraint checked (``edits_considered``) and
those it rejected (``edits_rejected``); with ``"none"`` nothing is counted and the attack's
configuration and results are what they were before the parameter existed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vlbench.api import TextAttack, check_range
from vlbench.errors import UserError

CONSTRAINTS = ("auto", "none", "meaning", "sentence-encoder")
#: the parameters of :class:`ConstrainedTextAttack`, left out of the configuration when unused
_PARAMS = {"none": ("constraint", "similarity", "encoder"), "auto": ("similarity", "encoder"),
           "meaning": ("similarity", "encoder"), "sentence-encoder": ()}


class SentenceEncoder:
    """A transformers encoder and its tokenizer; a text's embedding is the mean of the
    last hidden states over its tokens (padding excluded), L2-normalised."""

    def __init__(self, tokenizer, model, path: str):
        self.tokenizer, self.model, self.path = tokenizer, model.eval(), path
        self.model.requires_grad_(False)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        chunks = []
        for first in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[first:first + batch_size]), padding=True, truncation=True,
                                    return_tensors="pt")
            hidden = self.model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append(F.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1), dim=-1))
        return torch.cat(chunks) if chunks else torch.empty(0)

    def similarity(self, texts: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        """Cosine of each text's embedding with its reference's."""
        return (self.embed(texts) * self.embed(references)).sum(dim=-1)


_encoders: dict[str, SentenceEncoder] = {}


def load_sentence_encoder(folder: str) -> SentenceEncoder:
    """The encoder of a local model folder, loaded once per process; a missing or unreadable
    folder is a one-line :class:`UserError` naming the path."""
    path = Path(folder).expanduser().resolve()
    key = str(path)
    if key in _encoders:
        return _encoders[key]
    fix = ("put a transformers model folder there (config.json, model.safetensors and its tokenizer files, "
           "as save_pretrained(..., safe_serialization=True) writes them), or set the attack's encoder: to one, "
           "or use constraint: meaning or constraint: none")
    if not path.is_dir():
        raise UserError(f"sentence encoder {folder!r} not found: no folder at {path}", fix)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(key, local_files_only=True)
        model = AutoModel.from_pretrained(key, local_files_only=True, use_safetensors=True)  # never a pickle
    except Exception as exc:  # transformers raises OSError/ValueError variants
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"sentence encoder at {path} cannot be loaded offline from safetensors ({reason})",
                        fix) from None
    _encoders[key] = SentenceEncoder(tokenizer, model, key)
    return _encoders[key]


class ConstrainedTextAttack(TextAttack):
    """A text attack whose ``Params`` have ``constraint``, ``similarity`` and ``encoder``
    (see the module docstring); subclasses pass :meth:`acceptor` to the search."""

    def validate(self) -> None:
        p, owner = self.params, f"attack {self.name}"
        if p.constraint not in CONSTRAINTS:
            raise UserError(f"{owner} has constraint {p.constraint!r}", f"use one of {', '.join(CONSTRAINTS)}")
        check_range(owner, "similarity", p.similarity, -1.0, 1.0)
        if p.constraint == "sentence-encoder" and not p.encoder:
            raise UserError(f"{owner} has constraint sentence-encoder but no encoder",
                            "set encoder: to a local folder of a transformers sentence encoder")

    def prepare(self) -> None:
        self.encoder  # noqa: B018  (loads, or fails with a one-line error naming the folder)

    @property
    def encoder(self) -> SentenceEncoder | None:
        if self.params.constraint != "sentence-encoder":
            return None
        if "_encoder" not in self.__dict__:
            self._encoder = load_sentence_encoder(self.params.encoder)
        return self._encoder

    def config(self) -> dict:
        config = super().config()
        unused = _PARAMS[self.params.constraint]
        return {**config, "params": {k: v for k, v in config["params"].items() if k not in unused}}

    def constraint_threat_model(self) -> dict:
        """The constraint's part of the threat model (nothing when unconstrained)."""
        p = self.params
        if p.constraint == "none":
            return {}
        if p.constraint in ("auto", "meaning"):
            return {"constraint": p.constraint}
        return {"constraint": "sentence-encoder", "encoder": p.encoder, "similarity": p.similarity}

    def acceptor(self, objective) -> Callable[[list[str], list[int]], list[bool]] | None:
        """``accept(texts, rows)`` for the search, counting what it checks and rejects;
        None when unconstrained."""
        constraint = self.params.constraint
        if constraint == "auto":
            constraint = "none" if getattr(objective, "meaning", None) is None else "meaning"
        if constraint == "none":
            return None
        originals = list(objective.texts)
        if constraint == "meaning":
            parse = getattr(objective, "meaning", None)
            if parse is None:
                raise UserError(f"attack {self.name} has constraint meaning, but this dataset has no parser "
                                "for what its texts state",
                                "use constraint: sentence-encoder (with encoder: a local folder) or constraint: none")
            stated: dict[int, object] = {}

            def keeps(texts: list[str], rows: list[int]) -> list[bool]:
                for row in rows:
                    if row not in stated:
                        stated[row] = parse(originals[row])
                return [parse(text) == stated[row] for text, row in zip(texts, rows)]
        else:
            encoder, threshold = self.encoder, self.params.similarity
            embedded: dict[int, torch.Tensor] = {}

            def keeps(texts: list[str], rows: list[int]) -> list[bool]:
                new = list(dict.fromkeys(row for row in rows if row not in embedded))
                if new:
                    embedded.update(zip(new, encoder.embed([originals[row] for row in new])))
                similar = (encoder.embed(texts) * torch.stack([embedded[row] for row in rows])).sum(dim=-1)
                return (similar >= threshold).tolist()

        def accept(texts: list[str], rows: list[int]) -> list[bool]:
            kept = keeps(texts, rows)
            self.count("edits_considered", len(kept))
            self.count("edits_rejected", len(kept) - sum(kept))
            return kept

        return accept
