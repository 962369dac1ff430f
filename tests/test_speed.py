"""Speed, as ratios measured in one run (never absolute times): the embedding cache against
recomputing, and vlbench's PGD against a bare torch loop doing the same arithmetic."""

import time

import pytest
import torch
from torch.utils.data import TensorDataset

from vlbench import api
from vlbench.cache import EmbeddingCache
from vlbench.datasets import DatasetSpec, EvalData
from vlbench.perturb import SampleNoise
from vlbench.tasks import ClassificationObjective, EvalContext, classifier_weights, clean_image_embeddings


def best_of(fn, rounds=3):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.benchmark(group="cache")
def test_cached_embeddings_vs_recomputing(benchmark, tmp_path, tiny_victim):
    images = torch.rand(512, 3, 32, 32)
    data = EvalData(DatasetSpec("speed", "classification", "toy"), TensorDataset(images, torch.zeros(512)),
                    ["a"], ["{c}"], None)
    cache = EmbeddingCache(tmp_path)
    ctx = EvalContext(tiny_victim, cache, batch_size=128, progress=False)
    indices = list(range(512))
    uncached = best_of(lambda: clean_image_embeddings(EvalContext(tiny_victim, EmbeddingCache(enabled=False),
                                                                  128, False), data, indices))
    clean_image_embeddings(ctx, data, indices)
    result = benchmark(clean_image_embeddings, ctx, data, indices)
    assert result.shape[0] == 512
    speedup = uncached / benchmark.stats.stats.min
    benchmark.extra_info["uncached_over_cached"] = round(speedup, 2)
    assert speedup > 1.0, f"reading the cache is not faster than recomputing ({speedup:.2f}x)"


def bare_pgd(victim, images, weights, labels, eps, alpha, steps, seeds):
    """The same PGD written as a plain torch loop, with no vlbench abstractions; the random
    start is drawn per sample from its own seeded generator, as vlbench does."""
    delta = torch.stack([torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    delta = (images + (delta * 2 - 1) * eps).clamp(0, 1) - images
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = victim.logit_scale * victim.encode_image(images + delta) @ weights.T
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (images + delta).clamp(0, 1) - images
    return images + delta


@pytest.mark.benchmark(group="pgd")
def test_pgd_overhead_against_bare_loop(benchmark, tiny_victim):
    images = torch.rand(64, 3, 32, 32)
    weights = classifier_weights(tiny_victim, ["a", "b", "c"], ["{c}."])
    labels = torch.randint(0, 3, (64,))
    pgd = api.build("attacks", "pgd", {"eps": 4, "steps": 5, "step_size": 1})
    noise = SampleNoise(0, torch.arange(64))
    objective = ClassificationObjective(tiny_victim, weights, labels, noise)
    seeds = [noise.generator_for(k, 0).initial_seed() for k in range(64)]
    bare = best_of(lambda: bare_pgd(tiny_victim, images, weights, labels, 4 / 255, 1 / 255, 5, seeds))
    ours = benchmark(lambda: pgd.perturb_images(tiny_victim, images, objective, torch.Generator().manual_seed(0)))
    expected = bare_pgd(tiny_victim, images, weights, labels, 4 / 255, 1 / 255, 5, seeds)
    assert torch.allclose(ours, expected, atol=1e-6)
    ratio = benchmark.stats.stats.min / bare
    benchmark.extra_info["vlbench_over_bare"] = round(ratio, 2)
    assert ratio < 2.0, f"vlbench PGD is {ratio:.2f}x a bare torch loop"
