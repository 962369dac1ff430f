"""Masked language models for word-substitution attacks (BERT-Attack).

:func:`load_masked_lm` loads a BERT-style masked LM through transformers from a local folder
or the Hugging Face cache (``bert-base-uncased`` by default, as in the Co-Attack, SGA and
MMCoA code), never from the network, or — with the name ``world`` — a small BERT trained on
the synthetic world's captions, so substitutions on the world are meaningful offline. The
world's is shipped with the package beside the world CLIP (``vlbench/world/released/``,
checked against the sha256 of its files): trained on another CPU it would propose other
substitutes, and every user's BERT-Attack cells would differ. It lives in
:mod:`vlbench.world.mlm`, which trains and releases it.

:class:`MaskedLM` exposes what BERT-Attack needs: words → sub-token spans, the top-k
predictions and logits at every position of one unmasked forward pass, and the perplexity
used to rank multi-piece substitutes (Li et al., EMNLP 2020, §3.2).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from vlbench.errors import UserError
from vlbench.world.mlm import quiet_transformers

WORLD_MLM = "world"


class MaskedLM:
    """A tokenizer and a masked LM, with the operations BERT-Attack uses."""

    def __init__(self, tokenizer, model, name: str):
        self.tokenizer, self.model, self.name = tokenizer, model.eval(), name
        self.model.requires_grad_(False)
        #: results its users derive from it alone (BERT-Attack's substitutes per caption)
        self.memo: dict = {}

    def word_pieces(self, words: list[str], max_length: int = 30) -> tuple[list[int], list[tuple[int, int]]]:
        """Sub-token ids (with [CLS]/[SEP]) and each word's ``(start, end)`` span in them.

        Words whose pieces fall beyond ``max_length`` get an empty span (never substituted).
        """
        ids = [self.tokenizer.cls_token_id]
        spans = []
        for word in words:
            pieces = self.tokenizer.encode(word, add_special_tokens=False)
            start = len(ids)
            if start + len(pieces) > max_length - 1:
                spans.append((start, start))
                continue
            ids.extend(pieces)
            spans.append((start, len(ids)))
        ids.append(self.tokenizer.sep_token_id)
        return ids, spans

    @torch.no_grad()
    def top_k(self, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw logits and ids of the k best tokens at every position of one forward pass."""
        return self.top_k_many([ids], k)[0]

    @torch.no_grad()
    def top_k_many(self, sequences: list[list[int]], k: int, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`top_k` of several sequences, in padded batches (the padding is masked, so
        each sequence's logits are its own)."""
        results = []
        for first in range(0, len(sequences), batch_size):
            chunk = sequences[first:first + batch_size]
            length = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), length), self.tokenizer.pad_token_id)
            for row, sequence in enumerate(chunk):
                ids[row, :len(sequence)] = torch.tensor(sequence)
            logits = self.model(input_ids=ids, attention_mask=ids != self.tokenizer.pad_token_id).logits
            values, indices = logits.topk(k, dim=-1)
            results += [(values[row, :len(sequence)], indices[row, :len(sequence)]) for row, sequence in enumerate(chunk)]
        return results

    @torch.no_grad()
    def perplexity(self, sequences: torch.Tensor) -> torch.Tensor:
        """exp(mean cross-entropy of each sequence's own tokens), one per row."""
        logits = self.model(sequences).logits
        losses = F.cross_entropy(logits.flatten(0, 1), sequences.flatten(), reduction="none")
        return losses.view(sequences.shape).mean(dim=1).exp()

    def token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))

    def join(self, token_ids: list[int]) -> str:
        return self.tokenizer.convert_tokens_to_string([self.token(t) for t in token_ids]).strip()


def load_masked_lm(name_or_path: str = "bert-base-uncased") -> MaskedLM:
    """The masked LM of a folder or cache entry, loaded once per process and shared by every
    attack that names it (with its memo)."""
    if name_or_path == WORLD_MLM:
        from vlbench.world.mlm import released_world_mlm

        return _shared(str(released_world_mlm()), WORLD_MLM)
    return _shared(str(name_or_path), name_or_path)


_loaded: dict[tuple[str, str], MaskedLM] = {}


def _shared(path: str, name: str) -> MaskedLM:
    if (path, name) not in _loaded:
        _loaded[(path, name)] = _load_folder(path, name)
    return _loaded[(path, name)]


def _load_folder(name_or_path: str | Path, name: str) -> MaskedLM:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
        model = AutoModelForMaskedLM.from_pretrained(str(name_or_path), local_files_only=True,
                                                     use_safetensors=True)  # never a pickle
    except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError variants
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"masked LM {name!r} is not available offline ({reason})",
                        f"download it on a connected machine (huggingface-cli download {name}) into the "
                        f"Hugging Face cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}), "
                        "or set the attack's mlm: to a local folder, or mlm: world on the synthetic world") from None
    return MaskedLM(tokenizer, model, name)
