"""``vlbench models fetch`` and ``check`` against a real HTTP server on 127.0.0.1: direct URLs
(the card's address) and the Hugging Face hub (``HF_ENDPOINT``), each with a good file, a
corrupted one (one line, exit status 2, nothing left in the cache), a transfer cut midway (a
rerun resumes, or restarts where the server ignores ranges) and a 404. What is fetched then
loads offline, as a run reads it."""

import hashlib

import pytest
import torch
import yaml

from model_server import ModelServer
from release_fixtures import TINY_ARCH, random_clip, register_tiny_arch, write_open_clip, write_open_clip_hf, write_visual_state_dict
from vlbench.cli import main
from vlbench.models.card import get_model
from vlbench.models.factory import create_victim


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A server holding one image-tower release as a file and one open_clip layout on the
    hub, a model card naming them, and empty caches."""
    from huggingface_hub import constants

    register_tiny_arch(tmp_path / "configs")
    monkeypatch.setenv("VLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VLBENCH_PROGRESS_SECONDS", "0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    robust, base = random_clip(11), random_clip(12)
    release = write_visual_state_dict(robust, tmp_path / "src" / "vitb32_fare_eps_4.pt").read_bytes()
    hub = write_open_clip_hf(robust, tmp_path / "src" / "hub")
    hub_files = {p.name: p.read_bytes() for p in hub.iterdir()}
    with ModelServer() as server:
        server.files["/files/vitb32_fare_eps_4.pt"] = release
        server.repos["org/tiny-clip"] = hub_files
        server.repos["org/tiny-clip-changed"] = {**hub_files, "open_clip_model.safetensors": b"\0" * 1000}
        server.repos["timm/vit_base_patch32_clip_224.openai"] = {"open_clip_model.safetensors": b"\1" * 3000}
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        weights = sha256(hub_files["open_clip_model.safetensors"])
        visual = {"arch": TINY_ARCH, "format": "visual_state_dict", "towers": "visual", "base": "base"}
        models = {
            "base": {"arch": TINY_ARCH, "weights": {"path": str(write_open_clip(base, tmp_path / "base.safetensors"))},
                     "format": "open_clip", "quick_gelu": True},
            "fare": {**visual, "weights": {"url": f"{server.url}/files/vitb32_fare_eps_4.pt", "sha256": sha256(release)}},
            "fare-unverified": {**visual, "weights": {"url": f"{server.url}/files/vitb32_fare_eps_4.pt"}},
            "fare-corrupt": {**visual, "weights": {"url": f"{server.url}/files/vitb32_fare_eps_4.pt",
                                                   "sha256": sha256(b"what the publisher wrote")}},
            "fare-moved": {**visual, "weights": {"url": f"{server.url}/files/gone.pt", "sha256": sha256(release)}},
            "hub": {"arch": TINY_ARCH, "weights": {"hf_hub": "org/tiny-clip", "sha256": weights}, "format": "open_clip_hf"},
            "hub-changed": {"arch": TINY_ARCH, "weights": {"hf_hub": "org/tiny-clip-changed", "sha256": weights},
                            "format": "open_clip_hf"},
            "hub-missing": {"arch": TINY_ARCH, "weights": {"hf_hub": "org/nothing"}, "format": "open_clip_hf"},
            "openai": {"arch": "ViT-B-32", "weights": {"tag": "openai"}, "format": "open_clip", "quick_gelu": True},
        }
        card = tmp_path / "models.yaml"
        card.write_text(yaml.safe_dump({"models": models}))
        monkeypatch.setenv("VLBENCH_MODELS_FILE", str(card))
        yield server, robust, base, tmp_path


def fetch(capsys, *names):
    """Exit status, standard output, and the error: the one line it must be (progress lines
    before it are not errors)."""
    code = main(["models", "fetch", *names, "--no-progress"])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("vlbench: error")]
    assert len(errors) == (1 if code else 0) and (not errors or err.strip().endswith(errors[0])), err
    return code, out, errors[0] if errors else ""


def check(capsys, *names):
    code = main(["models", "check", *names])
    return code, capsys.readouterr().out


def embeddings(victim, images):
    with torch.no_grad():
        return victim.encode_image(images), victim.encode_text(victim.tokenize(["a photo of a cat."]))


def test_a_url_is_fetched_verified_and_loads_offline(world, capsys):
    server, robust, base, tmp_path = world
    assert "missing" in check(capsys, "fare")[1]
    code, out, err = fetch(capsys, "fare")
    assert code == 0 and "fare: downloaded" in out and "sha256 verified" in out
    assert (tmp_path / "cache" / "models" / "url").is_dir() and not any((tmp_path / "cache" / "models" / ".partial").iterdir())
    code, out = check(capsys, "fare")
    assert code == 0 and "present" in out and "verified" in out
    victim = create_victim(get_model("fare"))  # the image tower fetched, the text tower the base's
    images = torch.rand(2, 3, 32, 32)
    reference = create_victim(get_model("base"))
    reference.model.visual.load_state_dict(robust.visual.state_dict())
    for got, want in zip(embeddings(victim, images), embeddings(reference, images)):
        assert torch.allclose(got, want, atol=1e-6)
    code, out, _ = fetch(capsys, "fare")
    assert code == 0 and "already here" in out and sum(m == "GET" for m, _, _ in server.requests) == 1


def test_progress_is_lines_off_a_terminal(world, capsys):
    code = main(["models", "fetch", "fare"])
    err = capsys.readouterr().err
    assert code == 0 and "fetch fare: " in err and " MB" in err and "\r" not in err


def test_an_entry_without_a_sha256_is_fetched_and_says_it_is_unverified(world, capsys):
    code, out, _ = fetch(capsys, "fare-unverified")
    assert code == 0 and "UNVERIFIED" in out and sha256(world[0].files["/files/vitb32_fare_eps_4.pt"]) in out
    assert "–" in check(capsys, "fare-unverified")[1].splitlines()[2]


def test_a_corrupted_download_is_one_line_and_leaves_nothing(world, capsys):
    tmp_path = world[3]
    code, out, err = fetch(capsys, "fare-corrupt")
    assert code == 2 and "not the" in err and "was deleted" in err
    models = tmp_path / "cache" / "models"
    assert not (models / "url").exists() and not any((models / ".partial").iterdir())
    assert "missing" in check(capsys, "fare-corrupt")[1]


@pytest.mark.parametrize("ignore_range", [False, True])
def test_a_cut_transfer_resumes_or_restarts_on_the_next_fetch(world, capsys, ignore_range):
    server, tmp_path = world[0], world[3]
    server.ignore_range = ignore_range
    server.cut["/files/vitb32_fare_eps_4.pt"] = (20000, 1)
    code, _, err = fetch(capsys, "fare")
    assert code == 2 and "the transfer was cut" in err and "run the same command again" in err
    assert "missing" in check(capsys, "fare")[1]  # nothing a run would read
    code, out, _ = fetch(capsys, "fare")
    assert code == 0 and "sha256 verified" in out
    ranges = [r for m, p, r in server.requests if m == "GET"]
    assert ranges == [None, "bytes=20000-"]
    assert not any((tmp_path / "cache" / "models" / ".partial").iterdir())


def test_a_404_names_the_url(world, capsys):
    code, _, err = fetch(capsys, "fare-moved")
    assert code == 2 and f"{world[0].url}/files/gone.pt answered 404" in err


def test_a_hub_release_is_fetched_into_the_hugging_face_cache_and_loads_offline(world, capsys):
    server, robust, _, tmp_path = world
    code, out, _ = fetch(capsys, "hub")
    assert code == 0 and "sha256 verified" in out and str(tmp_path / "hub" / "models--org--tiny-clip") in out
    assert {p for _, p, _ in server.requests} == {"/org/tiny-clip/resolve/main/open_clip_config.json",
                                                   "/org/tiny-clip/resolve/main/open_clip_model.safetensors"}
    server.repos.clear()  # offline from here: the run reads the cache
    victim = create_victim(get_model("hub"))
    assert torch.equal(victim.model.visual.conv1.weight, robust.visual.conv1.weight)
    assert check(capsys, "hub")[0] == 0


def test_a_changed_hub_file_is_removed_from_the_cache(world, capsys):
    tmp_path = world[3]
    code, _, err = fetch(capsys, "hub-changed")
    assert code == 2 and "removed from the cache" in err
    blobs = list((tmp_path / "hub" / "models--org--tiny-clip-changed" / "blobs").iterdir())
    assert [b.stat().st_size for b in blobs] != [1000] and all(b.stat().st_size != 1000 for b in blobs)
    assert "missing" in check(capsys, "hub-changed")[1]


def test_a_cut_hub_transfer_resumes(world, capsys):
    """huggingface_hub retries a cut transfer itself (here from the start: its .incomplete
    file is cleaned up); a connection that keeps failing ends the fetch with one line, and the
    next fetch completes."""
    server, tmp_path = world[0], world[3]
    path = "/org/tiny-clip/resolve/main/open_clip_model.safetensors"
    server.cut[path] = (5000, 1)
    code, out, _ = fetch(capsys, "hub")
    assert code == 0 and "sha256 verified" in out
    assert len([r for m, p, r in server.requests if m == "GET" and p == path]) == 2
    for blob in (tmp_path / "hub").rglob("blobs/*"):
        blob.unlink()
    for link in (tmp_path / "hub").rglob("snapshots/*/*"):
        link.unlink()
    server.cut[path] = (5000, 100)
    code, _, err = fetch(capsys, "hub")
    assert code == 2 and "run the same command again" in err
    server.cut.clear()
    code, out, _ = fetch(capsys, "hub")
    assert code == 0 and "sha256 verified" in out


def test_a_missing_repository_is_one_line(world, capsys):
    code, _, err = fetch(capsys, "hub-missing")
    assert code == 2 and "hf-hub:org/nothing is not available" in err


def test_an_open_clip_tag_is_fetched_from_its_hub_copy(world, capsys):
    code, out, _ = fetch(capsys, "openai")
    assert code == 0 and "models--timm--vit_base_patch32_clip_224.openai" in out and "UNVERIFIED" in out


def test_fetch_checks_every_name_before_downloading(world, capsys):
    code, _, err = fetch(capsys, "fare,nonesuch")
    assert code == 2 and "unknown model 'nonesuch'" in err and world[0].requests == []


def test_check_reports_every_entry_and_fails_on_a_changed_file(world, capsys):
    tmp_path = world[3]
    assert fetch(capsys, "fare")[0] == 0
    path = next((tmp_path / "cache" / "models" / "url").rglob("vitb32_fare_eps_4.pt"))
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    code, out = check(capsys)
    assert code == 1 and "MISMATCH" in out and "1 differing from their entry" in out
    assert all(name in out for name in ("base", "fare", "hub", "openai"))


def test_fetch_all_fetches_what_it_can_and_names_the_rest(world, capsys):
    code = main(["models", "fetch", "all", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and "fare: downloaded" in out and "hub: downloaded" in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlbench: error: 4 of 9 entries were not fetched")
    assert all(name in last for name in ("fare-corrupt", "fare-moved", "hub-changed", "hub-missing"))
