"""What one victim's cells share: text embeddings, and the results of deterministic attacks
posed the same problem by different cells (BERT-Attack and SGA's first stage; pgd and the
image stage of mmcoa-attack), computed once and identical to computing them again."""

import pytest
import torch

from vlbench import api
from vlbench.data.datasets import load_dataset, subset_indices
from vlbench.evaluation.context import EvalContext
from vlbench.evaluation.tasks import evaluate
from vlbench.store.embeddings import EmbeddingCache

WORLD_TEXT = {"mlm": "world", "budget": 1}


def count_calls(monkeypatch, cls, method):
    calls = []
    original = getattr(cls, method)

    def counted(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, counted)
    return calls


@pytest.fixture()
def context(world_victim, tmp_path):
    return lambda: EvalContext(world_victim, EmbeddingCache(tmp_path / "cache"), 40, False, seed=0)


def test_sga_reuses_the_bert_attack_cell_for_its_first_stage(monkeypatch, context):
    data = load_dataset("world-retrieval")
    indices = subset_indices(len(data), 12, 0)
    bert = api.build("attacks", "bert-attack", WORLD_TEXT)
    sga = api.build("attacks", "sga", {"eps": 4, "steps": 2, "text_params": WORLD_TEXT})
    calls = count_calls(monkeypatch, type(bert), "perturb_texts")
    shared = context()
    evaluate(shared, data, indices, bert, torch.Generator().manual_seed(0))
    together = evaluate(shared, data, indices, sga, torch.Generator().manual_seed(1))
    assert len(calls) == 2  # the bert-attack cell, then only SGA's third stage
    apart = evaluate(context(), data, indices, sga, torch.Generator().manual_seed(1))
    assert together == apart and len(calls) == 4


def test_mmcoa_attack_reuses_the_pgd_cell_for_its_image_stage(monkeypatch, context):
    data = load_dataset("world-colour")
    indices = subset_indices(len(data), 30, 0)
    pgd = api.build("attacks", "pgd", {"eps": 4, "steps": 3, "step_size": 1})
    mmcoa = api.build("attacks", "mmcoa-attack", {"image_params": {"eps": 4, "steps": 3, "step_size": 1},
                                                  "text_params": WORLD_TEXT})
    calls = count_calls(monkeypatch, type(pgd), "perturb_images")
    shared = context()
    evaluate(shared, data, indices, pgd, torch.Generator().manual_seed(0))
    after_pgd = len(calls)
    together = evaluate(shared, data, indices, mmcoa, torch.Generator().manual_seed(1))
    assert len(calls) == after_pgd  # the image stage came from the pgd cell
    apart = evaluate(context(), data, indices, mmcoa, torch.Generator().manual_seed(1))
    assert together == apart and len(calls) > after_pgd
