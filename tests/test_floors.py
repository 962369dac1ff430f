"""The dependency floors in pyproject.toml are real: a fresh venv with exactly the lowest
version every requirement allows (the core's, the ``formats`` extra's and the ``test``
extra's) installs and passes the tests that exercise those libraries.

A floor raised by accident is harmless; one too low means a user's install resolves to a
release vlbench cannot run on (``create_model(weights_only=...)`` needs open_clip 3.0,
``BertTokenizer(vocab=dict)`` transformers 5, ``PIL.Image.Resampling`` Pillow 9.1, and
Pillow 9 prints deprecation warnings through torchvision, so the floor is 10).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# the libraries these tests exercise: open_clip, transformers, pandas and tabulate, PyYAML,
# safetensors, Pillow, scipy and h5py, pytest-benchmark, import-linter, filelock, submitit,
# matplotlib and selenium
TESTS = ["tests/test_model.py", "tests/test_bert_attack.py", "tests/test_leaderboard.py", "tests/test_page.py",
         "tests/test_loaders.py",
         "tests/test_configs.py", "tests/test_text_attacks.py", "tests/test_cache.py", "tests/test_layers.py",
         "tests/test_claims.py", "tests/test_slurm.py"]


def floors() -> list[str]:
    """``name==lowest`` for every requirement that applies here (exact pins stay exact)."""
    # the installed metadata, not pyproject.toml: tomllib is Python 3.11+, vlbench supports 3.10
    environment = default_environment()
    pins = []
    for line in requires("vlbench"):
        requirement = Requirement(line)
        if requirement.marker is not None and not any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in ("", "formats", "test")):
            continue
        (spec,) = requirement.specifier  # one bound per requirement, by convention of this file
        assert spec.operator in (">=", "=="), f"{line}: state a floor with >= (or an exact pin)"
        pins.append(f"{requirement.name}=={spec.version}")
    return pins


def test_every_requirement_has_one_floor():
    pins = floors()
    names = {pin.split("==")[0] for pin in pins}
    assert {"torch", "open_clip_torch", "transformers", "scipy", "h5py", "pytest-benchmark"} <= names


@pytest.mark.slow
def test_the_floors_install_and_pass(tmp_path):
    venv = tmp_path / "venv"
    try:
        _install_and_test(venv)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # several GB (torch): pytest keeps its temp folders


def _install_and_test(venv):
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, *floors()], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VLBENCH_CACHE", "PYTHONPATH")}
    tests = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            *TESTS], cwd=ROOT, capture_output=True, text=True, env=env)
    assert tests.returncode == 0, tests.stdout[-3000:]
