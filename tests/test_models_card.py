"""The model card (``models.yaml``): the shipped entries and what each says of itself, the one-line
errors of a bad entry, a config's own entries, and ``--pretrained hf-hub:ORG/NAME`` read from the
Hugging Face cache at run time."""

import json

import pytest
import yaml

from release_fixtures import TINY_ARCH, TINY_CONFIG, random_clip, register_tiny_arch, write_open_clip
from vlbench.cli import main
from vlbench.errors import UserError
from vlbench.models.card import card, entries_of, get_model
from vlbench.models.factory import load_victim, named_model

#: what the card must hold: the bases, the field's releases, the world CLIP
REQUIRED = {
    "openai-vit-b-32": ("ViT-B-32", "tag"), "openai-vit-b-16": ("ViT-B-16", "tag"),
    "openai-vit-l-14": ("ViT-L-14", "tag"), "laion2b-vit-b-32": ("ViT-B-32", "tag"),
    "tecoa-vit-b-32": ("ViT-B-32", "url"),
    "robustvlm-tecoa1-vit-b-32": ("ViT-B-32", "url"), "robustvlm-tecoa4-vit-b-32": ("ViT-B-32", "url"),
    "robustvlm-fare1-vit-b-32": ("ViT-B-32", "url"), "robustvlm-fare4-vit-b-32": ("ViT-B-32", "url"),
    "robustvlm-tecoa2-vit-l-14": ("ViT-L-14", "hf_hub"), "robustvlm-tecoa4-vit-l-14": ("ViT-L-14", "hf_hub"),
    "robustvlm-fare2-vit-l-14": ("ViT-L-14", "hf_hub"), "robustvlm-fare4-vit-l-14": ("ViT-L-14", "hf_hub"),
    "simclip4-vit-l-14": ("ViT-L-14", "hf_hub"), "leaf-vit-l-14": ("ViT-L-14", "hf_hub"),
    "leaf-text-vit-l-14": ("ViT-L-14", "hf_hub"), "delta-clip-vit-l-14": ("ViT-L-14", "hf_hub"),
    "tga-zsr-vit-b-32": ("ViT-B-32", "path"), "pmg-aft-vit-b-32": ("ViT-B-32", "path"),
    "world-clip": ("vlbench-world", "package"),
}


def test_the_card_holds_the_field_and_says_where_each_fact_was_read():
    import open_clip

    from vlbench.models.victim import register_model_configs

    register_model_configs()
    entries = card()
    for name, (arch, source) in REQUIRED.items():
        spec = get_model(name)
        assert (spec.arch, spec.weights.kind) == (arch, source), name
        assert spec.source and spec.paper and spec.licence, name
    for name, spec in entries.items():
        assert spec.arch in open_clip.list_models(), name
        assert name not in open_clip.list_models()  # an entry is never mistaken for an architecture
        if spec.base is not None:
            assert get_model(spec.base).towers == "full"
        if spec.weights.kind == "tag":
            assert spec.quick_gelu == bool(open_clip.get_pretrained_cfg(spec.arch, spec.weights.tag).get("quick_gelu"))
        if spec.weights.kind in ("url", "hf_hub") and spec.weights.sha256 is None:
            assert "sha256" in spec.unconfirmed, f"{name} does not say its sha256 is unpublished"
    # the published names, exactly as their sources give them
    assert get_model("robustvlm-fare2-vit-l-14").weights.hf_hub == "chs20/fare2-clip"
    assert get_model("tecoa-vit-b-32").format == "tecoa" and get_model("tecoa-vit-b-32").base == "openai-vit-b-32"
    assert get_model("robustvlm-fare4-vit-b-32").weights.url.endswith("/vitb32_fare_eps_4.pt")
    assert get_model("pmg-aft-vit-b-32").mean == (0.485, 0.456, 0.406)  # PMG-AFT normalises as ImageNet
    assert get_model("leaf-text-vit-l-14").towers == "text"


def test_ls_models_lists_every_entry_with_its_source(capsys):
    assert main(["ls", "models"]) == 0
    out = capsys.readouterr().out
    for name in card():
        assert f"\n{name} " in out
    assert "chs20/RobustVLM README.md" in out and "⚑ not confirmed from a file read" in out
    assert "tecoa-vit-b-32: the training epsilon is not stated" in out


@pytest.mark.parametrize("entry, problem", [
    ({"arch": "ViT-B-32", "format": "open_clip", "weights": {"tag": "openai", "path": "x.pt"}}, "names 2 sources"),
    ({"arch": "ViT-B-32", "format": "open_clip", "weights": {"url": "https://x/y.pt", "sha256": "abc"}},
     "is not 64 hex digits"),
    ({"arch": "ViT-B-32", "format": "open_clip", "weights": "https://x/y.pt"}, "a URL needs its sha256"),
    ({"arch": "ViT-B-32", "format": "zip", "weights": {"tag": "openai"}}, "format 'zip' is unknown"),
    ({"arch": "ViT-B-32", "format": "tecoa", "weights": {"path": "t.pth.tar"}}, "holds the image tower only"),
    ({"arch": "ViT-B-32", "format": "visual_state_dict", "towers": "visual", "weights": {"path": "v.pt"}},
     "needs a base entry"),
    ({"arch": "ViT-B-32", "format": "open_clip", "weights": {"tag": "openai"}, "licence": "MIT", "sha": 1},
     "unknown keys \\['sha'\\]"),
    ({"arch": "ViT-B-32", "weights": {"tag": "openai"}}, "lacks 'format'"),
    ({"arch": "ViT-B-32", "format": "open_clip", "weights": {"hf_hub": "org/name/file.bin"}}, "is not ORG/NAME"),
    ({"arch": "ViT-B-32", "format": "open_clip", "weights": {"tag": "openai"},
      "claimed": [{"model": "ViT-B-32", "value": 3}]}, "lacks dataset"),
])
def test_a_bad_entry_is_one_line(tmp_path, monkeypatch, capsys, entry, problem):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"bad": entry}}))
    monkeypatch.setenv("VLBENCH_MODELS_FILE", str(path))
    assert main(["ls", "models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model 'bad'" in err
    with pytest.raises(UserError, match=problem):
        card()


def test_a_config_may_add_entries_but_not_reuse_a_card_name(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": {"openai-vit-b-32": {"arch": "ViT-B-32", "format": "open_clip",
                                                                     "weights": {"path": "mine.pt"}}}}))
    assert main(["run", "matrix", "--config", str(config)]) == 2
    assert "already has" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown model 'openai-vit-b23'.*did you mean 'openai-vit-b-32'"):
        get_model("openai-vit-b23")


def test_a_release_base_must_be_a_full_model(tmp_path):
    raw = {"a": {"arch": "ViT-B-32", "format": "visual_state_dict", "towers": "visual", "base": "b",
                 "weights": {"path": "a.pt"}},
           "b": {"arch": "ViT-B-32", "format": "visual_state_dict", "towers": "visual", "base": "openai-vit-b-32",
                 "weights": {"path": "b.pt"}}}
    with pytest.raises(UserError, match="itself a visual-tower release"):
        get_model("a", entries_of(raw, "test", tmp_path))


def hub_cache(root, repo: str, files: dict[str, bytes], commit: str = "0123abcd" * 5):
    """A repository in the Hugging Face cache layout, as ``hf download`` leaves it."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / commit / name).write_bytes(data)


def test_pretrained_hf_hub_reads_the_hugging_face_cache(tmp_path, monkeypatch):
    """`--pretrained hf-hub:ORG/NAME` (open_clip's own form) is a repository, not a path: read
    from the cache at run time, or one line naming where it looked and how to fetch it."""
    from huggingface_hub import constants

    register_tiny_arch(tmp_path / "configs")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as info:
        load_victim(TINY_ARCH, "hf-hub:chs20/fare2-clip")
    message = str(info.value)
    assert "is not on this machine" in message and "models--chs20--fare2-clip" in message
    assert "hf download chs20/fare2-clip open_clip_config.json" in message and "does not exist" not in message
    model = random_clip(21)
    weights = write_open_clip(model, tmp_path / "w.safetensors").read_bytes()
    hub_cache(tmp_path / "hub", "lab/tiny", {"open_clip_config.json": json.dumps({"model_cfg": TINY_CONFIG}).encode(),
                                             "open_clip_model.safetensors": weights})
    spec = named_model(TINY_ARCH, "hf-hub:lab/tiny")
    assert (spec.format, spec.towers, spec.weights.hf_hub) == ("open_clip_hf", "full", "lab/tiny")
    victim = load_victim(TINY_ARCH, "hf-hub:lab/tiny")
    assert victim.fingerprint() == load_victim(f"{TINY_ARCH}-quickgelu", str(tmp_path / "w.safetensors")).fingerprint()
    # a file of a repository, and a revision
    torch_file = write_open_clip(model, tmp_path / "w.pt").read_bytes()
    hub_cache(tmp_path / "hub", "lab/files", {"vitb32_fare_eps_4.pt": torch_file}, commit="feed" * 10)
    assert named_model(TINY_ARCH, "hf-hub:lab/files/vitb32_fare_eps_4.pt@" + "feed" * 10).weights.file == \
        "vitb32_fare_eps_4.pt"
