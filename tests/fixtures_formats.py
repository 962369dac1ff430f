"""Writers of tiny datasets in the real on-disk formats, for the loader tests.

Each writer lays files out exactly as the published archive (or torchvision's download)
does, only with a handful of small images. Images carry a known value so a test can check
that pixels and labels arrive together.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


# -- pickles as the CIFAR archives hold them ----------------------------------------------------
class Py2StylePickler(pickle._Pickler):
    """Protocol-2 pickles shaped like the Python 2 ``cPickle`` files in the CIFAR archives.

    Python 2 wrote byte strings as ``BINSTRING`` (they load as ``str`` with
    ``encoding="latin1"``) and named numpy's reconstructor ``numpy.core.multiarray``; Python 3's
    pickler would instead route bytes through ``_codecs.encode`` and name ``numpy._core``.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:
        module, name = obj.__module__, name or obj.__qualname__
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core"):]
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def dump_py2_pickle(obj, path: Path) -> None:
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def cifar_pixels(labels: list[int]) -> np.ndarray:
    """N×3072 uint8 rows (R, G, B planes): red = 10·label, green = 0..31 down the rows, blue 7."""
    n = len(labels)
    image = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    image[:, 0] = (np.asarray(labels, dtype=np.uint8) * 10)[:, None, None]
    image[:, 1] = np.arange(32, dtype=np.uint8)[None, :, None] * 8
    image[:, 2] = 7
    return image.reshape(n, 3072)


def write_cifar10(root: Path, labels: list[int], names: list[str], train_batches: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    dump_py2_pickle({b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                     b"data": cifar_pixels(labels), b"filenames": [b"x.png"] * len(labels)},
                    root / "test_batch")
    for i in range(1, train_batches + 1):
        batch_labels = [(label + i) % len(names) for label in labels]
        dump_py2_pickle({b"labels": batch_labels, b"data": cifar_pixels(batch_labels)},
                        root / f"data_batch_{i}")
    dump_py2_pickle({b"label_names": [n.encode() for n in names], b"num_vis": 3072},
                    root / "batches.meta")
    return root


def write_cifar100(root: Path, fine: list[int], coarse: list[int], fine_names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    dump_py2_pickle({b"fine_labels": fine, b"coarse_labels": coarse, b"data": cifar_pixels(fine)},
                    root / "test")
    dump_py2_pickle({b"fine_label_names": [n.encode() for n in fine_names],
                     b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]},
                    root / "meta")
    return root


# -- STL-10 binary --------------------------------------------------------------------------------
def write_stl10(root: Path, labels: list[int], names: list[str]) -> Path:
    """``test_X.bin`` with each channel plane column-major; the top row of every image is 255."""
    root.mkdir(parents=True, exist_ok=True)
    images = np.zeros((len(labels), 3, 96, 96), dtype=np.uint8)  # N, C, H (row), W (col)
    images[:, :, 0, :] = 255
    images[:, 1] = (np.asarray(labels, dtype=np.uint8) * 20)[:, None, None]
    images[:, 1, 0, :] = 255
    # Column-major planes: store [N, C, W, H].
    images.transpose(0, 1, 3, 2).copy().tofile(root / "test_X.bin")
    (np.asarray(labels, dtype=np.uint8) + 1).tofile(root / "test_y.bin")
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    return root


# -- image files ----------------------------------------------------------------------------------
def write_jpeg(path: Path, value: int = 128, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 60)).save(path, "JPEG", quality=95)
    return path


def write_image_folder(folder: Path, classes: dict[str, int], suffix: str = ".jpg") -> Path:
    """One folder per class, ``count`` images each (their red channel is 10·class index)."""
    for index, (name, count) in enumerate(sorted(classes.items())):
        for i in range(count):
            write_jpeg(folder / name / f"img_{i:03d}{suffix}", value=10 * index)
    return folder


def write_karpathy(root: Path, annotations: str, images: list[dict], image_dir: str = "") -> Path:
    """A Karpathy split file plus a real JPEG for every listed image."""
    root.mkdir(parents=True, exist_ok=True)
    for i, entry in enumerate(images):
        write_jpeg(root / image_dir / entry.get("filepath", "") / entry["filename"], value=20 * i)
    payload = {"dataset": annotations.split("_")[-1].split(".")[0], "images": [
        {**entry, "imgid": i, "sentids": list(range(len(entry["sentences"]))),
         "sentences": [{"raw": s, "tokens": s.lower().split()} for s in entry["sentences"]]}
        for i, entry in enumerate(images)]}
    (root / annotations).write_text(json.dumps(payload))
    return root


# -- MATLAB and HDF5 --------------------------------------------------------------------------------
def write_flowers102(root: Path, labels: list[int], test_ids: list[int], train_ids: list[int]) -> Path:
    from scipy.io import savemat

    for image_id in range(1, len(labels) + 1):
        write_jpeg(root / "jpg" / f"image_{image_id:05d}.jpg", value=labels[image_id - 1])
    savemat(root / "imagelabels.mat", {"labels": np.asarray(labels, dtype=np.uint8)[None, :]})
    savemat(root / "setid.mat", {"tstid": np.asarray(test_ids, dtype=np.uint16)[None, :],
                                 "trnid": np.asarray(train_ids, dtype=np.uint16)[None, :],
                                 "valid": np.asarray(train_ids, dtype=np.uint16)[None, :]})
    return root


def write_stanford_cars(root: Path, samples: list[tuple[str, int]], class_names: list[str]) -> Path:
    """``cars_test_annos_withlabels.mat`` as a struct array (bbox fields, ``class``, ``fname``)."""
    from scipy.io import savemat

    for fname, label in samples:
        write_jpeg(root / "cars_test" / fname, value=10 * label)
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
              ("class", "O"), ("fname", "O")]
    records = np.zeros((1, len(samples)), dtype=fields)
    for i, (fname, label) in enumerate(samples):
        records[0, i] = (1, 1, 30, 20, label, fname)
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": records})
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.empty((1, len(class_names)), dtype=object)
    names[0, :] = class_names
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    return root


def write_pcam(root: Path, labels: list[int]) -> Path:
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    x = np.zeros((len(labels), 96, 96, 3), dtype=np.uint8)
    x[..., 0] = (np.asarray(labels, dtype=np.uint8) * 200)[:, None, None]
    with h5py.File(root / "camelyonpatch_level_2_split_test_x.h5", "w") as handle:
        handle.create_dataset("x", data=x)
    with h5py.File(root / "camelyonpatch_level_2_split_test_y.h5", "w") as handle:
        handle.create_dataset("y", data=np.asarray(labels, dtype=np.uint8).reshape(-1, 1, 1, 1))
    return root
