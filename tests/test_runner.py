"""The matrix runner: one immutable result per cell, resume, SIGKILL safety, skips, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlbench import api
from vlbench.cli import main
from vlbench.run.matrix import MatrixConfig, PluginSpec, make_plan, run_matrix
from vlbench.store.artifacts import RESULT_SCHEMA
from vlbench.store.embeddings import EmbeddingCache

REQUIRED_KEYS = {"schema", "cell", "defense", "attack", "dataset", "task", "config", "metrics", "n",
                 "subset_hash", "seed", "versions", "code_revision", "timings", "warnings", "adjustments"}


def config(out, checkpoint, **overrides):
    values = dict(pretrained=str(checkpoint), out=str(out), limit=60, batch_size=30,
                  defenses=[PluginSpec("none", "none")],
                  attacks=[PluginSpec("none", "none"), PluginSpec("pgd", "pgd", {"eps": 4, "steps": 3})],
                  datasets=["world-colour", "world-retrieval"])
    values.update(overrides)
    return MatrixConfig(**values)


def cell_files(out):
    return sorted((Path(out) / "cells").glob("*.json"))


def test_matrix_writes_one_result_per_cell_and_resumes(tmp_path, world_checkpoint_path):
    cfg = config(tmp_path / "out", world_checkpoint_path)
    run_matrix(cfg, progress=False, cache=EmbeddingCache(tmp_path / "cache"))
    files = cell_files(cfg.out)
    assert len(files) == 4
    results = {(r["attack"], r["dataset"]): r for r in (json.loads(f.read_text()) for f in files)}
    for result in results.values():
        assert REQUIRED_KEYS <= set(result) and result["n"] == 60
        assert result["config"]["attack"]["params"] or result["attack"] == "none"
    clean = results[("none", "world-colour")]["metrics"]["top1"]
    robust = results[("pgd", "world-colour")]["metrics"]["top1"]
    assert robust < clean
    assert {"i2t_R@1", "t2i_R@10", "clean_i2t_R@1"} <= set(results[("pgd", "world-retrieval")]["metrics"])

    stamps = {f: f.stat().st_mtime_ns for f in files}
    cache = EmbeddingCache(tmp_path / "cache")
    plan = run_matrix(cfg, progress=False, cache=cache)
    assert plan.todo() == [] and cache.misses == 0
    assert {f: f.stat().st_mtime_ns for f in cell_files(cfg.out)} == stamps


def test_subset_is_seeded_and_hashed(tmp_path, world_checkpoint_path):
    a = config(tmp_path / "a", world_checkpoint_path, attacks=[PluginSpec("none", "none")], datasets=["world-size"])
    b = config(tmp_path / "b", world_checkpoint_path, attacks=[PluginSpec("none", "none")], datasets=["world-size"],
               seed=1)
    run_matrix(a, progress=False)
    run_matrix(b, progress=False)
    ra, rb = (json.loads(cell_files(c.out)[0].read_text()) for c in (a, b))
    assert ra["subset_hash"] != rb["subset_hash"] and ra["n"] == rb["n"] == 60
    run_matrix(config(tmp_path / "c", world_checkpoint_path, attacks=[PluginSpec("none", "none")],
                      datasets=["world-size"]), progress=False)
    assert json.loads(cell_files(tmp_path / "c")[0].read_text())["subset_hash"] == ra["subset_hash"]


def test_defense_trains_once_and_is_reused(tmp_path, world_checkpoint_path):
    vanilla = PluginSpec("vanilla", "vanilla", {"steps": 4, "batch_size": 16, "warmup": 1, "optimizer": "adamw",
                                               "train_datasets": ["world-colour", "world-shape"]})
    first = config(tmp_path / "one", world_checkpoint_path, defenses=[vanilla],
                   attacks=[PluginSpec("none", "none")], datasets=["world-colour", "world-shape"])
    run_matrix(first, progress=False)
    models = [json.loads(f.read_text())["model"] for f in cell_files(first.out)]
    assert all(m["trained"] and not m["reused"] for m in models)
    assert len({m["fingerprint"] for m in models}) == 1
    second = config(tmp_path / "two", world_checkpoint_path, defenses=[vanilla], datasets=["world-colour"],
                    attacks=[PluginSpec("pgd", "pgd", {"steps": 1})])
    run_matrix(second, progress=False)
    reused = json.loads(cell_files(second.out)[0].read_text())["model"]
    assert reused["reused"] and reused["fingerprint"] == models[0]["fingerprint"]


def test_inapplicable_cells_are_skipped_with_a_reason(tmp_path, world_checkpoint_path):
    @api.attacks.register("classification-only-test")
    class ClassificationOnly(api.ImageAttack):
        tasks = ("classification",)
        version = "1"

        def perturb_images(self, victim, images, objective, generator):
            return images

    try:
        cfg = config(tmp_path, world_checkpoint_path,
                     attacks=[PluginSpec("classification-only-test", "co")])
        plan = make_plan(cfg)
        assert [c.dataset for c in plan.cells] == ["world-colour"]
        assert plan.skipped[0][2] == "world-retrieval" and "classification only" in plan.skipped[0][3]
    finally:
        api.attacks.unregister("classification-only-test")


@pytest.mark.slow
def test_sigkill_loses_no_finished_cell_and_leaves_no_partial_file(tmp_path, world_checkpoint_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vlbench", "run", "matrix", "--pretrained", str(world_checkpoint_path),
               "--defenses", "none", "--attacks", "none,pgd",
               "--datasets", "world-shape,world-colour,world-size",
               "--limit", "100", "--batch-size", "50", "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.time() + 240
    while time.time() < deadline and len(cell_files(out)) < 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = cell_files(out)
    assert 2 <= len(finished) < 6, process.stderr.read().decode()[-2000:]
    contents = {f: f.read_text() for f in finished}
    assert all(json.loads(text)["schema"] == RESULT_SCHEMA for text in contents.values())

    assert subprocess.run(command, capture_output=True, env=os.environ.copy()).returncode == 0
    after = cell_files(out)
    assert len(after) == 6
    assert all(f.read_text() == text for f, text in contents.items())
    assert not list((out / "cells").glob(".*"))


def test_a_version_bump_reruns_exactly_the_cells_it_touches(tmp_path, monkeypatch, world_checkpoint_path):
    from vlbench.store import artifacts

    cfg = config(tmp_path / "out", world_checkpoint_path,
                 defenses=[PluginSpec("none", "none"), PluginSpec("tecoa", "tecoa", {"steps": 1})],
                 attacks=[PluginSpec("none", "none"), PluginSpec("pgd", "pgd"), PluginSpec("apgd-ce", "apgd-ce")])
    plan = make_plan(cfg)
    for cell in plan.cells:  # every cell finished
        cell.path.parent.mkdir(parents=True, exist_ok=True)
        cell.path.write_text(json.dumps({"schema": RESULT_SCHEMA, "cell": cell.id}))
    assert make_plan(cfg).todo() == []

    def rerun():
        return sorted((c.defense_label, c.attack_label, c.dataset) for c in make_plan(cfg).todo())

    everything = sorted((c.defense_label, c.attack_label, c.dataset) for c in plan.cells)
    with monkeypatch.context() as patch:
        patch.setattr(api.attacks.get("pgd"), "version", "2")
        assert rerun() == [cell for cell in everything if cell[1] == "pgd"] and len(rerun()) == 4
    with monkeypatch.context() as patch:
        patch.setattr(api.defenses.get("tecoa"), "version", "2")
        assert rerun() == [cell for cell in everything if cell[0] == "tecoa"]
    with monkeypatch.context() as patch:  # the training code: trained models only
        patch.setattr(artifacts, "TRAINING_VERSION", "2")
        assert rerun() == [cell for cell in everything if cell[0] == "tecoa"]
    with monkeypatch.context() as patch:  # the result schema: everything
        patch.setattr(artifacts, "RESULT_SCHEMA", 99)
        assert rerun() == everything
    assert make_plan(cfg).todo() == []


def test_training_data_is_checked_only_for_the_defenses_a_run_trains(tmp_path, monkeypatch, world_checkpoint_path):
    tecoa = PluginSpec("tecoa", "tecoa", {"steps": 1, "batch_size": 4, "train_datasets": ["world-shape"]})
    cfg = config(tmp_path / "out", world_checkpoint_path, defenses=[tecoa], attacks=[PluginSpec("none", "none")],
                 datasets=["world-colour"])
    run_matrix(cfg, progress=False)  # trains and caches the checkpoint
    checked = []
    monkeypatch.setattr(api.defenses.get("tecoa"), "check_training_data", lambda self: checked.append(self.name))
    cfg.attacks = [PluginSpec("pgd", "pgd", {"steps": 1})]
    run_matrix(cfg, progress=False)
    assert checked == []  # its checkpoint is cached: no training data needed
    cfg.defenses = [PluginSpec("tecoa", "tecoa", {**tecoa.options, "steps": 2})]
    make_plan(cfg)  # a new config: this one trains, so its data are checked first
    with monkeypatch.context() as patch:
        patch.setattr(api.defenses.get("tecoa"), "fit", lambda *a: pytest.fail("trained before the data check"))
        patch.setattr(api.defenses.get("tecoa"), "check_training_data",
                      lambda self: (_ for _ in ()).throw(api.UserError("no data", "fix")))
        with pytest.raises(api.UserError, match="no data"):
            run_matrix(cfg, progress=False)


# -- bad input: one line, exit 2, nothing written -------------------------------------------
def run_cli(capsys, *args):
    code = main(["run", "matrix", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("args, expected", [
    (["--defenses", "vanila"], "unknown defense 'vanila'; did you mean 'vanilla'"),
    (["--attacks", "pgdd"], "unknown attack 'pgdd'; did you mean 'pgd'"),
    (["--datasets", "world-colur"], "did you mean 'world-colour'"),
    (["--datasets", "cifar10"], "dataset 'cifar10' not found"),
    (["--limit", "0"], "--limit must be positive"),
    (["--device", "cuda:3"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_bad_names_and_values(tmp_path, capsys, world_checkpoint_path, monkeypatch, args, expected):
    monkeypatch.setenv("VLBENCH_DATA", str(tmp_path / "no-data"))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--pretrained", str(world_checkpoint_path), "--out", str(out), *args)
    assert code == 2 and expected in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_malformed_yaml_and_bad_eps_in_config(tmp_path, capsys):
    out = tmp_path / "out"
    broken = tmp_path / "broken.yaml"
    broken.write_text("defenses: [none\nattacks: none\n")
    code, err = run_cli(capsys, "--config", str(broken), "--out", str(out))
    assert code == 2 and "malformed YAML" in err and "line" in err and "\n" not in err
    eps = tmp_path / "eps.yaml"
    eps.write_text("defenses: [none]\nattacks: [{pgd: {eps: 300}}]\ndatasets: [world-colour]\n")
    code, err = run_cli(capsys, "--config", str(eps), "--out", str(out))
    assert code == 2 and "eps=300.0/255 is out of range" in err
    code, err = run_cli(capsys, "--config", str(tmp_path / "absent.yaml"))
    assert code == 2 and "does not exist" in err
    assert not out.exists()


@pytest.mark.parametrize("line, expected", [
    ("limit: '200'", "config {path} key 'limit' must be int | None, got '200'"),
    ("batch_size: -5", "the batch size must be positive, got -5"),
    ("seed: 1.5", "key 'seed' must be int, got 1.5"),
    ("precision: 16", "key 'precision' must be str, got 16"),
])
def test_mistyped_config_values_are_one_line(tmp_path, capsys, line, expected):
    path = tmp_path / "typed.yaml"
    path.write_text(f"defenses: [none]\nattacks: [none]\ndatasets: [world-colour]\n{line}\n")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--config", str(path), "--out", str(out))
    assert code == 2 and expected.format(path=path) in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("{}")
    code, err = run_cli(capsys, "--out", str(out), "--defenses", "none", "--attacks", "none",
                        "--datasets", "world-colour")
    assert code == 2 and "is a file, not a folder" in err and "\n" not in err
    assert out.read_text() == "{}"


def test_mistyped_dataset_card_entry_is_one_line(tmp_path, capsys, monkeypatch):
    card = tmp_path / "datasets.yaml"
    card.write_text("datasets:\n  world-colour:\n    task: classification\n    loader: world\n    options:\n")
    monkeypatch.setenv("VLBENCH_DATASETS_FILE", str(card))
    code, err = run_cli(capsys, "--out", str(tmp_path / "out"), "--defenses", "none", "--attacks", "none",
                        "--datasets", "world-colour")
    assert code == 2 and "'options' must be dict[str, Any], got None" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not weights")
    code, err = run_cli(capsys, "--pretrained", str(bad), "--out", str(tmp_path / "out"),
                        "--datasets", "world-colour", "--attacks", "none", "--defenses", "none")
    assert code == 2 and "unreadable checkpoint" in err and "\n" not in err
    assert not list((tmp_path / "out").rglob("*.json"))


def test_a_run_reports_its_plan_first_and_its_time_by_phase_last(tmp_path, world_checkpoint_path):
    cfg = config(tmp_path / "out", world_checkpoint_path, datasets=["world-colour"])
    lines = []
    run_matrix(cfg, progress=False, cache=EmbeddingCache(tmp_path / "cache"), report=lines.append)
    assert lines[0].startswith("plan: 2 cells") and "2 to run, 0 already done" in lines[0]
    estimate = next(line for line in lines if "estimate:" in line)
    assert "warm-up" in estimate and "unknown" not in estimate
    assert lines[-1].startswith("time by phase:") and "evaluate pgd" in lines[-1] and "total" in lines[-1]
    again = []
    run_matrix(cfg, progress=False, cache=EmbeddingCache(tmp_path / "cache"), report=again.append)
    assert again == [f"plan: all 2 cells of {cfg.out} are done"]


def test_rates_are_measured_on_a_copy(world_victim):
    from vlbench.monitor.cost import Rates, Work

    fingerprint = world_victim.fingerprint()
    world_victim.weights_changed()
    rates = Rates.measure(world_victim, image_batch=8, text_batch=16)
    world_victim.weights_changed()
    assert world_victim.fingerprint() == fingerprint and not world_victim.model.training
    assert min(rates.image_grads, rates.image_steps, rates.text_forwards, rates.text_steps) > 0
    work = Work(image_grads=100) + 2 * Work(text_forwards=10)
    assert rates.seconds(work) == pytest.approx(100 * rates.image_grads + 20 * rates.text_forwards)


def test_every_builtin_plugin_states_its_work():

    api.discover()
    for name in api.attacks.names():
        attack = api.build("attacks", name)
        for task in attack.tasks:
            assert attack.work(task, 10, 50, 5 if task == "classification" else 0) is not None, name
    for name in api.defenses.names():
        assert api.build("defenses", name).work() is not None, name


def test_a_run_removes_only_the_temporary_files_of_dead_writers(tmp_path, world_checkpoint_path):
    import socket

    cells = tmp_path / "out" / "cells"
    cells.mkdir(parents=True)
    host = socket.gethostname().replace(".", "-")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    live = cells / f".a.json.{host}-{os.getpid()}.x1.tmp"        # another run, still writing
    dead = cells / f".b.json.{host}-{dead_pid}.x2.tmp"           # a run killed mid-write
    foreign = cells / ".c.json.otherhost-1.x3.tmp"                # another host's: cannot tell
    for path in (live, dead, foreign):
        path.write_text("{")
    run_matrix(config(tmp_path / "out", world_checkpoint_path, attacks=[PluginSpec("none", "none")],
                      datasets=["world-size"]), progress=False)
    assert live.exists() and foreign.exists() and not dead.exists()
    assert len(cell_files(tmp_path / "out")) == 1


@pytest.mark.slow
def test_two_runs_on_one_folder_train_a_defense_once(tmp_path, world_checkpoint_path):
    """Started together on one out dir and one cache: one process trains, the other waits
    and reuses its checkpoint; neither removes what the other is writing."""
    recipe = tmp_path / "two.yaml"
    recipe.write_text("defenses: [{vanilla: {steps: 40, batch_size: 16, warmup: 1, train_datasets: [world-colour]}}]\n"
                      "attacks: [none]\ndatasets: [world-colour]\nlimit: 40\n")
    command = [sys.executable, "-m", "vlbench", "run", "matrix", "--config", str(recipe), "--pretrained",
               str(world_checkpoint_path), "--out", str(tmp_path / "out"), "--no-progress"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=os.environ.copy()) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    trained = [line for output in outputs for line in output.splitlines() if line.strip().startswith("train vanilla")]
    assert len(trained) == 1, outputs
    (cell,) = cell_files(tmp_path / "out")
    checkpoint = Path(json.loads(cell.read_text())["model"]["checkpoint"])
    assert checkpoint.is_file() and not checkpoint.with_suffix(".partial").exists()
    assert not list((tmp_path / "out" / "cells").glob(".*"))


def test_missing_open_clip_weights_are_one_line_at_once(tmp_path):
    """Without HF_HUB_OFFLINE in the environment: vlbench decides offline mode before
    huggingface_hub reads it, so there is no retrying against the hub and no warnings."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    for model in (["--model", "ViT-B-32", "--pretrained", "openai"], ["--model", "openai-vit-b-32"]):
        done = subprocess.run([sys.executable, "-m", "vlbench", "run", "matrix", *model, "--defenses", "none",
                               "--attacks", "none", "--datasets", "world-colour", "--out", str(tmp_path / "out"),
                               "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "is not on this machine" in lines[0]
        assert str(tmp_path / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai") in lines[0]
        assert ("vlbench models fetch openai-vit-b-32" in lines[0]) == (model[1] == "openai-vit-b-32")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("defense, expected", [
    ("{tecoa: {train_datasets: [world-retrieval]}}", "defense tecoa trains on classification data; "
                                                      "world-retrieval is a retrieval dataset"),
    ("{nn: {train_datasets: [world-colour]}}", "defense nn trains on retrieval data"),
    ("{nn: {train_datasets: [world-retrieval, world-retrieval]}}", "defense nn trains on one retrieval dataset"),
    ("{fare: {train_datasets: [world-colur]}}", "did you mean 'world-colour'"),
    ("{vanilla: {train_datasets: [cifar10]}}", "dataset 'cifar10' not found"),
])
def test_bad_training_data_is_found_before_any_work(tmp_path, capsys, monkeypatch, world_checkpoint_path,
                                                    defense, expected):
    monkeypatch.setenv("VLBENCH_DATA", str(tmp_path / "no-data"))
    path = tmp_path / "train.yaml"
    path.write_text(f"defenses: [{defense}]\nattacks: [none]\ndatasets: [world-colour]\n")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--config", str(path), "--out", str(out), "--pretrained", str(world_checkpoint_path))
    assert code == 2 and expected in err and "\n" not in err and "Traceback" not in err
    assert not out.exists() and "plan:" not in err


def test_every_task_the_card_allows_is_a_registered_task_class():
    from vlbench.data.spec import TASKS
    from vlbench.evaluation.tasks import PRIMARY_METRICS, Task, tasks

    assert set(tasks.names()) == set(TASKS) and set(PRIMARY_METRICS) == set(TASKS)
    assert all(issubclass(tasks.get(name), Task) and tasks.get(name).primary_metrics for name in TASKS)


def test_a_list_for_a_parameter_sweeps_it(tmp_path, world_checkpoint_path):
    pgd = PluginSpec.parse({"pgd": {"eps": [1, 2, 4.5], "steps": 3}}, "attack")
    assert [(e.label, e.options["eps"]) for e in pgd.sweep("attacks")] == [("pgd@1", 1), ("pgd@2", 2), ("pgd@4.5", 4.5)]
    two = PluginSpec.parse({"name": "pgd", "label": "p", "eps": [1, 2], "steps": [3, 5]}, "attack").sweep("attacks")
    assert [e.label for e in two] == ["p@eps=1,steps=3", "p@eps=1,steps=5", "p@eps=2,steps=3", "p@eps=2,steps=5"]
    # a parameter that takes a list is no sweep
    assert PluginSpec.parse({"autoattack": {"components": ["apgd-ce"]}}, "attack").sweep("attacks")[0].label == "autoattack"
    cfg = config(tmp_path / "out", world_checkpoint_path, attacks=[pgd], datasets=["world-colour"])
    assert [cell.attack_label for cell in make_plan(cfg).cells] == ["pgd@1", "pgd@2", "pgd@4.5"]
    assert [cell.attack.eps * 255 for cell in make_plan(cfg).cells] == pytest.approx([1, 2, 4.5])
    cfg.attacks = [PluginSpec.parse({"pgd": {"eps": []}}, "attack")]
    with pytest.raises(api.UserError, match="sweeps eps over no values"):
        make_plan(cfg)
