"""The victim wrapper, and loading a model from an architecture and weights (the release formats
and the model card have tests of their own)."""

import pytest
import torch

from vlbench.errors import UserError
from vlbench.models.factory import load_victim
from vlbench.models.victim import WORLD_MODEL


def test_images_of_any_resolution_are_resized_inside(world_victim):
    small = world_victim.encode_image(torch.rand(2, 3, 16, 16))
    large = world_victim.encode_image(torch.rand(2, 3, 48, 48))
    assert small.shape == large.shape
    assert torch.allclose(small.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_gradients_reach_the_pixels(world_victim):
    pixels = torch.rand(2, 3, 32, 32, requires_grad=True)
    world_victim.encode_image(pixels).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_local_checkpoint_round_trip(tmp_path, world_victim):
    state = world_victim.model.state_dict()
    torch.save(state, tmp_path / "model.pt")
    loaded = load_victim(WORLD_MODEL, str(tmp_path / "model.pt"))
    assert loaded.fingerprint() == world_victim.fingerprint()


def test_unknown_architecture_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean 'ViT-B-32'"):
        load_victim("ViT-B-23", "openai")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_victim(WORLD_MODEL, str(tmp_path / "nowhere.safetensors"))


def test_garbage_checkpoint_is_unreadable(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="unreadable checkpoint"):
        load_victim(WORLD_MODEL, str(bad))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, evil)
    with pytest.raises(UserError, match="unreadable checkpoint"):
        load_victim(WORLD_MODEL, str(evil))
    assert "this must never run" not in capsys.readouterr().out


def test_a_pretrained_tag_not_on_this_machine_names_the_fetch_and_the_path(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as info:
        load_victim("RN50", "openai")
    message = str(info.value)
    assert "not on this machine" in message and "hf download timm/resnet50_clip.openai" in message
    assert str(tmp_path / "hub" / "models--timm--resnet50_clip.openai") in message and "\n" not in message


def test_unknown_pretrained_tag():
    with pytest.raises(UserError, match="RN50 has no pretrained tag 'nonsense'; use one of"):
        load_victim("RN50", "nonsense")


def test_text_features_skip_the_padding_but_not_the_result(tiny_victim, world_victim):
    texts = ["a red circle.", "a large blue star in the bottom right on a dotted background.", "x"]
    for victim in (tiny_victim, world_victim):
        tokens = victim.tokenize(texts)
        assert victim._trim and int((tokens != 0).sum(1).max()) < tokens.shape[1]
        with torch.no_grad():
            trimmed = victim.encode_text(tokens)
            full = torch.nn.functional.normalize(victim.model.encode_text(tokens), dim=-1)
        assert torch.allclose(trimmed, full, atol=1e-5)
        # one text alone gets the features it gets in a batch of longer ones
        assert torch.allclose(victim.encode_text(victim.tokenize(texts[:1])), trimmed[:1], atol=1e-5)


def test_tokens_are_cached_per_string_and_shared_by_copies(tiny_victim):
    import copy

    texts = ["a red circle.", "a blue square.", "a red circle."]
    tokens = tiny_victim.tokenize(texts)
    assert torch.equal(tokens, tiny_victim.tokenizer(texts))
    assert torch.equal(tokens[0], tokens[2])
    twin = copy.deepcopy(tiny_victim)
    assert twin._token_rows is tiny_victim._token_rows
    assert tiny_victim.tokenize([]).shape[0] == 0


def test_an_architecture_without_weights_is_one_line():
    with pytest.raises(UserError, match="'vlbench-world' is neither a model entry nor given weights"):
        load_victim(WORLD_MODEL)
