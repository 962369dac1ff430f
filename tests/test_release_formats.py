"""Every release format loads into the model its source was, to float tolerance: image and text
embeddings equal the source model's, with the other tower from the base where a release
replaces one tower; a checkpoint of another architecture, or in another format than its entry
says, is one line; pickles load with ``weights_only=True`` only.

The sources use OpenAI's activation, as OpenAI's CLIP and every release fine-tuned from it
do: entries say ``quick_gelu: true`` (the transformers format says it in its config), and
``--model`` names the ``-quickgelu`` architecture."""

import pytest
import torch

from release_fixtures import (TINY_ARCH, hf_clip, random_clip, register_tiny_arch, write_open_clip,
                              write_open_clip_hf, write_tecoa, write_transformers, write_visual_state_dict)
from vlbench.errors import UserError
from vlbench.models.card import entries_of
from vlbench.models.factory import create_victim, load_victim
from vlbench.models.victim import Victim

TEXTS = ["a photo of a cat.", "a large blue star in the bottom right on a dotted background.", "x"]


QUICK = f"{TINY_ARCH}-quickgelu"


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    register_tiny_arch(tmp_path_factory.mktemp("configs"))
    return TINY_ARCH


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def embeddings(victim: Victim, images):
    with torch.no_grad():
        return victim.encode_image(images), victim.encode_text(victim.tokenize(TEXTS))


def of_source(model, images):
    import open_clip

    return embeddings(Victim(model, open_clip.get_tokenizer(TINY_ARCH, context_length=16), "source", None), images)


def entries(raw: dict, root):
    return entries_of(raw, "the test's models", root)


def load(raw: dict, name: str, root):
    found = entries(raw, root)
    return create_victim(found[name], extra=found)


@pytest.mark.parametrize("file, kwargs", [
    ("model.safetensors", {}),
    ("model.pt", {}),
    ("checkpoint.pt", {"wrapped": True, "data_parallel": True}),  # {"state_dict": ...} with module. prefixes
])
def test_open_clip_state_dicts_load_equal(arch, images, tmp_path, file, kwargs):
    source = random_clip(1)
    path = write_open_clip(source, tmp_path / file, **kwargs)
    victim = load({"mine": {"arch": arch, "weights": {"path": str(path)}, "format": "open_clip",
                             "quick_gelu": True}}, "mine", tmp_path)
    for got, want in zip(embeddings(victim, images), of_source(source, images)):
        assert torch.allclose(got, want, atol=1e-5)
    # the same file through --model/--pretrained, its format read from the file
    for got, want in zip(embeddings(load_victim(QUICK, str(path)), images), of_source(source, images)):
        assert torch.allclose(got, want, atol=1e-5)


def test_the_activation_is_the_entrys_to_state(arch, images, tmp_path):
    """open_clip 3 builds a plain architecture with GELU whatever the weights were trained with:
    without quick_gelu an OpenAI-activation model loads without error and computes other
    embeddings, which is why every entry fine-tuned from OpenAI's CLIP says it."""
    source = random_clip(1)
    path = write_open_clip(source, tmp_path / "model.safetensors")
    plain = load({"mine": {"arch": arch, "weights": {"path": str(path)}, "format": "open_clip"}}, "mine", tmp_path)
    assert not torch.allclose(embeddings(plain, images)[0], of_source(source, images)[0], atol=1e-4)


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_the_hugging_face_open_clip_layout_loads_equal(arch, images, tmp_path, weights):
    source = random_clip(2)
    folder = write_open_clip_hf(source, tmp_path / "release", weights=weights)
    victim = load({"mine": {"arch": arch, "weights": {"path": str(folder)}, "format": "open_clip_hf"}}, "mine", tmp_path)
    for got, want in zip(embeddings(victim, images), of_source(source, images)):
        assert torch.allclose(got, want, atol=1e-5)  # the layout's own model_cfg says quick_gelu
    assert torch.allclose(embeddings(load_victim(arch, str(folder)), images)[0], of_source(source, images)[0], atol=1e-5)


def test_image_tower_releases_load_onto_their_base(arch, images, tmp_path):
    """RobustVLM's visual state dict and TeCoA's checkpoint carry the image tower of one model;
    the text tower is the base entry's, another model here, so each tower is checked apart."""
    robust, base = random_clip(3), random_clip(4)
    base_file = write_open_clip(base, tmp_path / "base.safetensors")
    raw = {"base": {"arch": arch, "weights": {"path": str(base_file)}, "format": "open_clip", "quick_gelu": True},
           "robustvlm": {"arch": arch, "weights": {"path": str(write_visual_state_dict(robust, tmp_path / "v.pt"))},
                         "format": "visual_state_dict", "towers": "visual", "base": "base"},
           "tecoa": {"arch": arch, "weights": {"path": str(write_tecoa(robust, tmp_path / "TeCoAmodel_best.pth.tar"))},
                     "format": "tecoa", "towers": "visual", "base": "base"}}
    want_image, _ = of_source(robust, images)
    _, want_text = of_source(base, images)
    for name in ("robustvlm", "tecoa"):
        image, text = embeddings(load(raw, name, tmp_path), images)
        assert torch.allclose(image, want_image, atol=1e-5) and torch.allclose(text, want_text, atol=1e-5), name
    # --pretrained on top of an entry: the format and the tower read from the file
    for path in (tmp_path / "v.pt", tmp_path / "TeCoAmodel_best.pth.tar"):
        image, text = embeddings(load_victim("base", str(path), extra=entries(raw, tmp_path)), images)
        assert torch.allclose(image, want_image, atol=1e-5) and torch.allclose(text, want_text, atol=1e-5)
    with pytest.raises(UserError, match="holds the image tower alone.*--model"):
        load_victim(QUICK, str(tmp_path / "v.pt"))


def test_a_transformers_clip_folder_loads_equal_to_transformers(arch, images, tmp_path):
    """A transformers CLIPModel (LEAF's releases), renamed to open_clip's layout, gives the
    embeddings transformers computes, whole and as a text tower on a base."""
    hf = hf_clip(5)
    folder = write_transformers(hf, tmp_path / "leaf")
    victim = load({"leaf": {"arch": arch, "weights": {"path": str(folder)}, "format": "transformers"}}, "leaf", tmp_path)
    tokens = victim.tokenize(TEXTS)
    with torch.no_grad():
        want_image = hf.get_image_features(pixel_values=victim.preprocess(images)).pooler_output
        want_text = hf.get_text_features(input_ids=tokens).pooler_output
    image, text = embeddings(victim, images)
    assert torch.allclose(image, torch.nn.functional.normalize(want_image, dim=-1), atol=1e-5)
    assert torch.allclose(text, torch.nn.functional.normalize(want_text, dim=-1), atol=1e-5)
    base = random_clip(6)
    raw = {"base": {"arch": arch, "weights": {"path": str(write_open_clip(base, tmp_path / "b.safetensors"))},
                    "format": "open_clip", "quick_gelu": True},
           "leaf-text": {"arch": arch, "weights": {"path": str(folder)}, "format": "transformers", "towers": "text",
                         "base": "base"}}
    image, text = embeddings(load(raw, "leaf-text", tmp_path), images)
    assert torch.allclose(image, of_source(base, images)[0], atol=1e-5)
    assert torch.allclose(text, torch.nn.functional.normalize(want_text, dim=-1), atol=1e-5)


def test_another_architectures_checkpoint_names_the_shapes(arch, tmp_path):
    from vlbench.world.pretrain import build_victim

    other = build_victim().model  # the world CLIP: a ResNet's visual tensors, a wider text tower
    path = write_open_clip(other, tmp_path / "rn50.safetensors")
    with pytest.raises(UserError) as info:
        load({"mine": {"arch": arch, "weights": {"path": str(path)}, "format": "open_clip"}}, "mine", tmp_path)
    message = str(info.value)
    assert "does not fit vlbench-tiny-vit" in message and "in vlbench-tiny-vit but" in message
    assert "check arch:" in message and "\n" not in message
    visual = write_visual_state_dict(other, tmp_path / "rn50-visual.pt")
    raw = {"base": {"arch": arch, "weights": {"path": str(write_open_clip(random_clip(7), tmp_path / "b.safetensors"))},
                    "format": "open_clip"},
           "wrong": {"arch": arch, "weights": {"path": str(visual)}, "format": "visual_state_dict", "towers": "visual",
                     "base": "base"}}
    with pytest.raises(UserError, match=r"does not fit vlbench-tiny-vit's visual tower: visual.conv1.weight is "
                                        r"\[32, 3, 8, 8\] in .* but \[\d+, 3, 3, 3\] in the checkpoint"):
        load(raw, "wrong", tmp_path)


def test_a_file_in_another_format_than_its_entry_says_is_one_line(arch, tmp_path):
    model = random_clip(8)
    raw = {"base": {"arch": arch, "weights": {"path": str(write_open_clip(model, tmp_path / "b.safetensors"))},
                    "format": "open_clip"},
           "says-tecoa": {"arch": arch, "weights": {"path": str(write_visual_state_dict(model, tmp_path / "v.pt"))},
                          "format": "tecoa", "towers": "visual", "base": "base"},
           "says-visual": {"arch": arch, "weights": {"path": str(tmp_path / "b.safetensors")},
                           "format": "visual_state_dict", "towers": "visual", "base": "base"}}
    with pytest.raises(UserError, match="has no vision_encoder_state_dict"):
        load(raw, "says-tecoa", tmp_path)
    with pytest.raises(UserError, match="holds a whole CLIP"):
        load(raw, "says-visual", tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("fmt", ["tecoa", "visual_state_dict", "open_clip"])
def test_pickled_code_is_never_run(arch, tmp_path, capsys, fmt):
    evil = tmp_path / "evil.pt"
    torch.save({"vision_encoder_state_dict": Payload(), "state_dict": Payload()}, evil)
    towers = {} if fmt == "open_clip" else {"towers": "visual", "base": "base"}
    raw = {"base": {"arch": arch, "weights": {"path": str(write_open_clip(random_clip(9), tmp_path / "b.safetensors"))},
                    "format": "open_clip"},
           "evil": {"arch": arch, "weights": {"path": str(evil)}, "format": fmt, **towers}}
    with pytest.raises(UserError, match="unreadable checkpoint .*weights_only=True"):
        load(raw, "evil", tmp_path)
    assert "this must never run" not in capsys.readouterr().out


def test_a_web_page_saved_as_weights_says_so(arch, tmp_path):
    page = tmp_path / "vitb32_fare_eps_4.pt"
    page.write_text("<!DOCTYPE html><html><body>Google Drive can't scan this file for viruses</body></html>")
    with pytest.raises(UserError, match="it is a web page, not weights"):
        load_victim(arch, str(page))
