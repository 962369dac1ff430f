"""Shared fixtures: an isolated cache, a tiny random CLIP, and a quickly pretrained world model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never touch the user's cache: everything below goes to a throw-away folder.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="vlbench-test-cache-"))
os.environ["VLBENCH_CACHE"] = str(_SESSION_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_victim():
    """A randomly initialised, very small open_clip CLIP wrapped as a Victim (32×32 input)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from vlbench.models.victim import Victim

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    model.requires_grad_(False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return Victim(model, tokenizer, "tiny-test", None)


# Synonyms from step 0 (plain_caption_steps=0), as before the default recipe waited for the
# text tower: the same weights as the checkpoint the README's masking-fixture audit measured.
QUICK_WORLD = dict(steps=60, n_train=2000, text_frozen_steps=30, plain_caption_steps=0)


@pytest.fixture(scope="session")
def world_checkpoint_path():
    """A world CLIP pretrained briefly (tens of seconds): good enough to be attacked."""
    from vlbench.world.pretrain import PretrainConfig, world_checkpoint

    return world_checkpoint(PretrainConfig(**QUICK_WORLD))


@pytest.fixture(scope="session")
def world_victim(world_checkpoint_path):
    from vlbench.models.factory import load_victim
    from vlbench.models.victim import WORLD_MODEL

    victim = load_victim(WORLD_MODEL, str(world_checkpoint_path))
    victim.requires_grad_(False)
    return victim


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the end-to-end tests marked slow (minutes each)")
    parser.addoption("--run-heavy", action="store_true",
                     help="also run the release checks marked heavy (tens of minutes each: the other CPU kernel "
                     "family, the cross-check against torchattacks, the default audit)")


def pytest_collection_modifyitems(config, items):
    # Slow end-to-end tests and heavy release checks are deselected (not skipped) unless asked
    # for: the default run stays within a few minutes and reports no skips, and a landing's CI
    # (--run-slow) within its budget; the heavy ones run before a release and in closing notes.
    for marker, option in (("slow", "--run-slow"), ("heavy", "--run-heavy")):
        if config.getoption(option):
            continue
        dropped = [item for item in items if marker in item.keywords]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if marker not in item.keywords]
