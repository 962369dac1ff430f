"""Random-weight stand-ins for the released models a zoo config names, and tiny copies of its
datasets, each in its real format, where vlbench looks for them: so the zoo protocols run end
to end on a machine that cannot download the real ones.

Every model entry a config's rows stand on (and their bases) gets random weights of its
architecture in its release format: tags and ``hf_hub`` repositories in the Hugging Face
cache's layout (``refs/main``, ``snapshots/<commit>/``), URLs in vlbench's URL cache, the
TeCoA dict and RobustVLM's image-tower state dict as published. Every dataset gets a few
images in its on-disk format with all its classes declared. Run it by hand to measure a whole
protocol::

    HF_HOME=/tmp/zoo/hf VLBENCH_CACHE=/tmp/zoo/cache python tests/zoo_fixtures.py \\
        configs/zoo-vit-b-32.yaml --data-root /tmp/zoo/data
    HF_HOME=/tmp/zoo/hf VLBENCH_CACHE=/tmp/zoo/cache vlbench run matrix \\
        --config configs/zoo-vit-b-32.yaml --data-root /tmp/zoo/data --limit 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures_formats import (write_cifar10, write_cifar100, write_flowers102, write_image_folder,  # noqa: E402
                              write_jpeg, write_pcam, write_stanford_cars, write_stl10)

IMAGES = 4  # per dataset: a --limit of up to 4 samples sees each


def write_model(spec, seed: int, extra=None) -> list[Path]:
    """Random weights for ``spec`` in its release format, where :mod:`vlbench.models.weights`
    looks for them; returns the files written."""
    import open_clip
    from safetensors.torch import save_file

    from vlbench.models.factory import architecture_victim
    from vlbench.models.formats import OPEN_CLIP_CONFIG
    from vlbench.models.weights import hub_cache, hub_files, url_path

    torch.manual_seed(seed)
    model = architecture_victim(spec, extra=extra).model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    kind, fmt = spec.weights.kind, spec.format
    if kind in ("tag", "hf_hub"):
        files = hub_files(spec)[0]
        commit = hashlib.sha1(files.repo.encode()).hexdigest()
        folder = hub_cache() / ("models--" + files.repo.replace("/", "--"))
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / (files.revision or "main")).write_text(commit)
        written = []
        for group in files.groups:
            name = group[0]
            path = snapshot / name
            if name == OPEN_CLIP_CONFIG:
                cfg = dict(open_clip.get_model_config(spec.arch), **({"quick_gelu": True} if spec.quick_gelu else {}))
                path.write_text(json.dumps({"model_cfg": cfg}))
            elif name.endswith(".safetensors"):
                save_file(state, str(path))
            elif fmt == "visual_state_dict":
                torch.save(visual, path)
            else:
                torch.save(state, path)
            written.append(path)
        return written
    if kind == "url":
        path = url_path(spec)
    elif kind == "path":
        path = spec.local_path()
    else:
        return []  # a build makes its own weights
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "tecoa":
        torch.save({"epoch": 10, "state_dict": {}, "add_prompter": None, "best_acc1": 0.0,
                    "vision_encoder_state_dict": {f"module.{k}": v for k, v in visual.items()}}, path)
    elif fmt == "visual_state_dict":
        torch.save(visual, path)
    else:
        torch.save(state, path)
    return [path]


def write_dataset(name: str, root: Path) -> Path:
    """A few images of dataset ``name`` in its on-disk format under the data root ``root``,
    every class of its card entry declared."""
    from vlbench.data.datasets import get_spec

    spec = get_spec(name)
    classes = len(spec.classnames or [])
    labels = [i % max(classes, 1) for i in range(IMAGES)]
    folder = root / (spec.root or name)
    options = spec.options or {}
    if spec.loader == "cifar10":
        return write_cifar10(folder, labels, list(spec.classnames))
    if spec.loader == "cifar100":
        return write_cifar100(folder, labels, [0] * IMAGES, [c.replace(" ", "_") for c in spec.classnames])
    if spec.loader == "stl10":
        return write_stl10(folder, labels, list(spec.classnames))
    if spec.loader == "pcam":
        return write_pcam(folder, labels)
    if spec.loader == "flowers102":
        return write_flowers102(folder, [label + 1 for label in labels], list(range(1, IMAGES + 1)), [1])
    if spec.loader == "stanford_cars":
        return write_stanford_cars(folder, [(f"{i:05d}.jpg", label + 1) for i, label in enumerate(labels)],
                                   [f"car {i}" for i in range(classes)])
    if spec.loader == "imagefolder":
        target = folder / str(options.get("folder", spec.split))
        write_image_folder(target, {f"class{i:04d}": (1 if i < IMAGES else 0) for i in range(classes)})
        for i in range(classes):
            (target / f"class{i:04d}").mkdir(parents=True, exist_ok=True)
        return folder
    if spec.loader == "oxford_pets":
        lines = [f"breed{label:02d}_{i} {label + 1} 1 1" for i, label in enumerate(labels)]
        lines += [f"breed{c:02d}_99 {c + 1} 1 1" for c in range(classes) if c not in labels]
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            write_jpeg(folder / "images" / f"{line.split()[0]}.jpg")
        return folder
    if spec.loader == "dtd":
        entries = [f"texture{c:02d}/texture{c:02d}_0001.jpg" for c in range(classes)]
        (folder / "dtd" / "labels").mkdir(parents=True, exist_ok=True)
        (folder / "dtd" / "labels" / "test1.txt").write_text("\n".join(entries) + "\n")
        for entry in entries:
            write_jpeg(folder / "dtd" / "images" / entry)
        return folder
    if spec.loader == "fgvc_aircraft":
        data = folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "variants.txt").write_text("\n".join(f"variant {c}" for c in range(classes)) + "\n")
        (data / "images_variant_test.txt").write_text("\n".join(f"{i:07d} variant {label}"
                                                                for i, label in enumerate(labels)) + "\n")
        for i in range(IMAGES):
            write_jpeg(data / "images" / f"{i:07d}.jpg")
        return folder
    raise ValueError(f"no fixture writer for {name} ({spec.loader})")


def write_protocol(config: Path, data_root: Path, seed: int = 0) -> None:
    """Every model and dataset ``config`` evaluates, as random-weight stand-ins and tiny copies."""
    from vlbench.cli import build_parser, matrix_config
    from vlbench.run.bases import chain, row_model

    cfg = matrix_config(build_parser().parse_args(["run", "matrix", "--config", str(config)]))
    models = {m.name: m for spec in cfg.defenses for row in spec.sweep("defenses")
              for m in chain(row_model(cfg, row), cfg)}
    for index, spec in enumerate(models.values()):
        write_model(spec, seed + index, cfg.models)
    for name in cfg.datasets:
        write_dataset(name, data_root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--data-root", type=Path, required=True)
    args = parser.parse_args()
    write_protocol(args.config, args.data_root)
