"""A tiny, randomly initialised BERT written to a folder in the real transformers format
(a word-level tokenizer and the weights), for tests of models loaded from local folders."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder: Path, words, safe: bool = True, hidden: int = 16, seed: int = 0) -> Path:
    """Save a masked-LM BERT over ``words`` to ``folder``: as safetensors, or (``safe=False``)
    as a pickled ``pytorch_model.bin`` only. Its encoder loads as a plain ``AutoModel`` too."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    folder = Path(folder)
    vocab = {w: i for i, w in enumerate(SPECIAL + [w for w in dict.fromkeys(words) if w not in SPECIAL])}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=2 * hidden,
                                       max_position_embeddings=64))
    if safe:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        model.config.save_pretrained(folder)
    return folder
