"""Loaders for the real datasets' on-disk formats (registered in :data:`vlbench.data.datasets.loaders`).

Each loader reads one format from the folder its card entry's ``root`` resolves to and
returns a :class:`~vlbench.data.datasets.LoadedSplit` whose images load lazily, one file (or one
array row) per ``__getitem__``, so ImageNet's 50,000 validation images cost only a file list.
Nothing is downloaded and no checksum is verified: a missing file raises
:class:`~vlbench.data.datasets.DatasetMissing` naming the exact path that was expected.

The layouts are torchvision's where torchvision defines one, so a torchvision download root
can serve as the vlbench data root: each card ``root`` is the folder torchvision creates
inside its ``root`` argument. Paths below are relative to the dataset's resolved root.

=================  ==============================================================================
loader             format and layout
=================  ==============================================================================
``cifar10``        CIFAR-10 python batches (as torchvision's ``CIFAR10``): ``test_batch``,
                   ``data_batch_1`` … ``data_batch_5``, ``batches.meta``. Each batch is a pickle
                   of ``{data: uint8 N×3072 (R, G, B planes of 32×32), labels: [int]}``; read with
                   a restricted unpickler that allows only numpy's array reconstruction.
``cifar100``       CIFAR-100 python files (as torchvision's ``CIFAR100``): ``test``, ``train``,
                   ``meta``; labels from ``fine_labels`` (``options: {labels: coarse}`` for the
                   20 superclasses).
``stl10``          STL-10 binary (as torchvision's ``STL10``): ``test_X.bin`` / ``train_X.bin``
                   (uint8, N×3×96×96, each plane stored column-major), ``test_y.bin`` /
                   ``train_y.bin`` (uint8 labels 1…10), ``class_names.txt``.
``imagefolder``    One sub-folder per class, classes in sorted folder-name order (as torchvision's
                   ``ImageFolder``), under the split's name or, for datasets without splits
                   (split ``all``), under ``options.folder``.
                   ImageNet: ``val/<wnid>/*.JPEG``; Caltech-101: ``101_ObjectCategories/``
                   without ``BACKGROUND_Google``; Caltech-256: ``256_ObjectCategories/``;
                   EuroSAT: ``2750/``.
``oxford_pets``    Oxford-IIIT Pet (as torchvision's ``OxfordIIITPet``):
                   ``annotations/{test,trainval}.txt`` (``image_id class_id species breed_id``,
                   ids from 1) and ``images/<image_id>.jpg``.
``flowers102``     Oxford Flowers-102 (as torchvision's ``Flowers102``): ``jpg/image_NNNNN.jpg``,
                   ``imagelabels.mat`` (``labels``, 1…102), ``setid.mat`` (``trnid``, ``valid``,
                   ``tstid``). Needs scipy.
``fgvc_aircraft``  FGVC-Aircraft 2013b (as torchvision's ``FGVCAircraft``):
                   ``data/images_variant_{split}.txt`` (``image_id Variant Name``),
                   ``data/variants.txt``, ``data/images/<image_id>.jpg``
                   (``options: {level: family|manufacturer}`` for the coarser labels).
``stanford_cars``  Stanford Cars (as torchvision's ``StanfordCars``): ``cars_test/``,
                   ``cars_test_annos_withlabels.mat`` (``annotations``: ``fname``, ``class``
                   from 1), ``devkit/cars_meta.mat`` (``class_names``); train from
                   ``devkit/cars_train_annos.mat`` and ``cars_train/``. Needs scipy.
``sun397``         SUN397 (as torchvision's ``SUN397``): ``ClassName.txt`` (``/a/abbey`` …) and
                   ``<letter>/<class>/sun_*.jpg``. Split ``all`` is every image (as
                   TeCoA/MMCoA evaluate); ``train``/``test`` read the official partition
                   ``Training_01.txt`` / ``Testing_01.txt`` (in the root or ``Partitions/``).
``food101``        Food-101 (as torchvision's ``Food101``): ``meta/{test,train}.json``
                   (``{class: ["class/image_id", …]}``) and ``images/<class>/<image_id>.jpg``;
                   classes in sorted order.
``dtd``            Describable Textures (as torchvision's ``DTD``, whose root holds the tarball's
                   ``dtd/`` folder): ``dtd/labels/{test,train,val}<partition>.txt``
                   (``class/image.jpg``) and ``dtd/images/``; ``options: {partition: 1}``.
``pcam``           PatchCamelyon (as torchvision's ``PCAM``):
                   ``camelyonpatch_level_2_split_{test,train,valid}_{x,y}.h5`` (datasets ``x``:
                   N×96×96×3 uint8, ``y``: N×1×1×1). Needs h5py.
``karpathy``       Image-text retrieval on Karpathy & Fei-Fei's splits: ``options.annotations``
                   (``dataset_flickr30k.json`` / ``dataset_coco.json``; ``images[i]`` with
                   ``split``, ``filename``, optional ``filepath``, ``sentences[j].raw``) and the
                   images at ``[options.images/][filepath/]filename`` (Flickr30k:
                   ``flickr30k-images/``; COCO: ``val2014/`` from ``filepath``).
=================  ==============================================================================

Class names that a format carries are returned cleaned the TeCoA way (lower case, ``_`` and
``-`` as spaces); the shipped card usually fixes its own, cleaned names instead. When the card
lists class names, their count must match the classes found on disk.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vlbench.data.spec import DatasetMissing, DatasetSpec, LoadedSplit, loaders
from vlbench.errors import UserError

#: File suffixes that count as images in class folders (lower-cased).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# -- shared pieces ------------------------------------------------------------------------
def clean_classname(name: str) -> str:
    """TeCoA's ``refine_classname``: lower case, ``_`` and ``-`` become spaces."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _default_transform(image: Image.Image):
    from torchvision.transforms.functional import to_tensor

    return to_tensor(image.convert("RGB"))


def _require(spec: DatasetSpec, path: Path, what: str = "file") -> Path:
    """``path`` if it exists, else one clear :class:`DatasetMissing` naming it."""
    if not path.exists():
        raise DatasetMissing(spec.name, path, spec.source, what)
    return path


def _check_split(spec: DatasetSpec, allowed: Sequence[str]) -> str:
    if spec.split not in allowed:
        raise UserError(f"dataset {spec.name!r} has split {spec.split!r}",
                        f"its {spec.loader} loader reads {', '.join(map(repr, allowed))}")
    return spec.split


def _check_classes(spec: DatasetSpec, found: int, where: Path) -> None:
    """The card's class names must line up with the classes on disk, one to one."""
    if spec.classnames is not None and len(spec.classnames) != found:
        raise UserError(
            f"dataset {spec.name!r} lists {len(spec.classnames)} class names in the card but "
            f"{where} has {found} classes",
            "check that the dataset is complete, or fix the card's classnames")


def _check_labels(spec: DatasetSpec, labels: Sequence[int], n_classes: int, where: Path) -> None:
    if len(labels) and (min(labels) < 0 or max(labels) >= n_classes):
        raise UserError(f"dataset {spec.name!r}: labels in {where} run outside 0…{n_classes - 1}",
                        "the file is corrupt or not in the expected format")


def _option(spec: DatasetSpec, key: str, default: Any) -> Any:
    return spec.options.get(key, default) if spec.options else default


def _mat(spec: DatasetSpec, path: Path) -> dict:
    """A MATLAB ``.mat`` file as scipy reads it (squeezed)."""
    _require(spec, path)
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError(f"dataset {spec.name!r} stores its labels in .mat files, which need scipy",
                        "install it: pip install 'vlbench[formats]' (or scipy)") from None
    return loadmat(str(path), squeeze_me=True)


class FileImages(Dataset):
    """Images read from files on demand: item ``i`` is ``(transform(open(paths[i])), targets[i])``.

    A file that has gone missing raises :class:`DatasetMissing` naming it.
    """

    def __init__(self, paths: Sequence[str | Path], targets: Sequence[int], transform: Callable | None,
                 name: str, source: str | None):
        self.paths = [str(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.transform = transform or _default_transform
        self.name, self.source = name, source

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image), self.targets[index]
        except FileNotFoundError:
            raise DatasetMissing(self.name, Path(path), self.source, "image file") from None


class ArrayImages(Dataset):
    """Images held as a uint8 N×H×W×C array (CIFAR)."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], transform: Callable | None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform or _default_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.targets[index]


# -- CIFAR: python pickles, read with a restricted unpickler ------------------------------------
#: The only globals a CIFAR batch references: numpy's array reconstruction (numpy < 2 names it
#: ``numpy.core``, numpy ≥ 2 ``numpy._core``). Anything else means the file is not a CIFAR batch.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _numpy_reconstruct() -> Callable:
    try:  # numpy >= 2; importing numpy.core there warns
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array-reconstruction globals.

    Unpickling can call any importable function, so a downloaded pickle is code. CIFAR's python
    batches need nothing but ``_reconstruct``, ``ndarray`` and ``dtype``; every other global
    (``os.system``, ``builtins.eval``, …) is refused before it is looked up.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return _numpy_reconstruct() if name == "_reconstruct" else getattr(np, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing to unpickle a persistent id")


def restricted_unpickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`.

    ``latin1`` decodes the Python 2 strings in the original files (keys and array bytes) the way
    numpy expects.
    """
    with open(path, "rb") as handle:
        return RestrictedUnpickler(handle, encoding="latin1").load()


def _read_cifar_pickle(spec: DatasetSpec, path: Path) -> dict[str, Any]:
    _require(spec, path)
    try:
        raw = restricted_unpickle(path)
    except pickle.UnpicklingError as exc:
        raise UserError(f"dataset {spec.name!r}: {path} is not a plain CIFAR pickle ({exc})",
                        "replace it with the file from the official archive") from None
    except (EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"dataset {spec.name!r}: cannot read {path} ({exc})",
                        "the file is truncated or corrupt; extract it again") from None
    if not isinstance(raw, dict):
        raise UserError(f"dataset {spec.name!r}: {path} holds a {type(raw).__name__}, not a dict",
                        "replace it with the file from the official archive")
    # Keys are Python 2 str in the originals (str after latin1) but may be bytes in re-pickles.
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in raw.items()}


def _cifar_images(spec: DatasetSpec, batch: dict[str, Any], path: Path) -> np.ndarray:
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"dataset {spec.name!r}: {path} has no uint8 N×3072 'data' array",
                        "replace it with the file from the official archive")
    # Rows are the R, G and B planes of a 32×32 image, each row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _strings(values: Any) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def _load_cifar(spec: DatasetSpec, root: Path, transform, *, files: dict[str, list[str]],
                label_key: str, meta_file: str, names_key: str) -> LoadedSplit:
    split = _check_split(spec, tuple(files))
    images, labels = [], []
    for filename in files[split]:
        path = root / filename
        batch = _read_cifar_pickle(spec, path)
        if label_key not in batch:
            raise UserError(f"dataset {spec.name!r}: {path} has no {label_key!r} entry",
                            "replace it with the file from the official archive")
        images.append(_cifar_images(spec, batch, path))
        labels.extend(int(label) for label in batch[label_key])
    array = np.concatenate(images) if len(images) > 1 else images[0]
    if len(array) != len(labels):
        raise UserError(f"dataset {spec.name!r}: {len(array)} images but {len(labels)} labels in "
                        f"{root}", "the files are corrupt; extract the archive again")
    classnames = None
    meta = root / meta_file
    if meta.exists():  # the card normally fixes the names; the meta file is a fallback
        names = _read_cifar_pickle(spec, meta).get(names_key)
        classnames = [clean_classname(n) for n in _strings(names)] if names is not None else None
        if classnames:
            _check_classes(spec, len(classnames), meta)
    known = classnames or spec.classnames
    _check_labels(spec, labels, len(known) if known else max(labels, default=-1) + 1, root)
    return LoadedSplit(images=ArrayImages(array, labels, transform), classnames=classnames)


@loaders.register("cifar10")
def load_cifar10(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """CIFAR-10 from ``cifar-10-batches-py/`` (splits ``test``, ``train``)."""
    return _load_cifar(spec, root, transform,
                       files={"test": ["test_batch"],
                              "train": [f"data_batch_{i}" for i in range(1, 6)]},
                       label_key="labels", meta_file="batches.meta", names_key="label_names")


@loaders.register("cifar100")
def load_cifar100(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """CIFAR-100 from ``cifar-100-python/`` (splits ``test``, ``train``)."""
    level = _option(spec, "labels", "fine")
    if level not in ("fine", "coarse"):
        raise UserError(f"dataset {spec.name!r} has options.labels = {level!r}",
                        "use 'fine' (100 classes) or 'coarse' (20 superclasses)")
    return _load_cifar(spec, root, transform, files={"test": ["test"], "train": ["train"]},
                       label_key=f"{level}_labels", meta_file="meta",
                       names_key=f"{level}_label_names")


# -- STL-10 binary ----------------------------------------------------------------------------
class STL10Images(Dataset):
    """STL-10 images memory-mapped from ``*_X.bin`` (opened lazily, once per process)."""

    SIDE = 96

    def __init__(self, path: Path, targets: Sequence[int], transform: Callable | None):
        self.path = str(path)
        self.targets = [int(t) for t in targets]
        self.transform = transform or _default_transform
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self) -> dict:  # worker processes map the file themselves
        return {**self.__dict__, "_array": None}

    def __getitem__(self, index: int):
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r").reshape(
                -1, 3, self.SIDE, self.SIDE)
        # Each channel plane is stored column-major: swap to H×W×C.
        pixels = np.ascontiguousarray(self._array[index].transpose(2, 1, 0))
        return self.transform(Image.fromarray(pixels)), self.targets[index]


@loaders.register("stl10")
def load_stl10(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """STL-10 from ``stl10_binary/`` (splits ``test``, ``train``; the unlabeled set is unused)."""
    split = _check_split(spec, ("test", "train"))
    images = _require(spec, root / f"{split}_X.bin")
    labels_path = _require(spec, root / f"{split}_y.bin")
    labels = (np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1).tolist()
    per_image = 3 * STL10Images.SIDE ** 2
    size = images.stat().st_size
    if size % per_image or size // per_image != len(labels):
        raise UserError(f"dataset {spec.name!r}: {images} holds {size / per_image:g} images but "
                        f"{labels_path} {len(labels)} labels", "extract the archive again")
    names_path = root / "class_names.txt"
    classnames = None
    if names_path.exists():
        classnames = [clean_classname(line) for line in names_path.read_text().splitlines()
                      if line.strip()]
        _check_classes(spec, len(classnames), names_path)
    _check_labels(spec, labels, len(classnames or spec.classnames or []) or 10, labels_path)
    return LoadedSplit(images=STL10Images(images, labels, transform), classnames=classnames)


# -- class folders ----------------------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


@loaders.register("imagefolder")
def load_imagefolder(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """Class sub-folders under ``root/<split>`` (ImageNet's ``val``, ``train``), sorted by name.

    ``options.folder`` names one fixed folder instead, for datasets published without splits
    (Caltech, EuroSAT); their only split is ``all``. ``options.exclude`` lists folders that are
    not classes (Caltech-101's ``BACKGROUND_Google``). Images are the files with an image suffix
    directly inside each class folder, sorted.
    """
    fixed = _option(spec, "folder", None)
    if fixed is not None:
        # A fixed folder holds the whole dataset: asking it for "train" must not silently
        # return the evaluation images.
        _check_split(spec, ("all",))
    folder = _require(spec, root / str(fixed or spec.split), "a folder of class folders")
    exclude = set(_option(spec, "exclude", []) or [])
    classes = sorted(entry.name for entry in os.scandir(folder)
                     if entry.is_dir() and entry.name not in exclude and not entry.name.startswith("."))
    if not classes:
        raise DatasetMissing(spec.name, folder / "<class>", spec.source, "class folders")
    _check_classes(spec, len(classes), folder)
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = _image_files(folder / name)
        paths.extend(files)
        labels.extend([index] * len(files))
    if not paths:
        raise DatasetMissing(spec.name, folder / classes[0] / "<image>", spec.source, "image files")
    return LoadedSplit(images=FileImages(paths, labels, transform, spec.name, spec.source),
                       classnames=[clean_classname(name) for name in classes])


# -- Oxford-IIIT Pet ----------------------------------------------------------------------------
@loaders.register("oxford_pets")
def load_oxford_pets(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """Oxford-IIIT Pet from ``oxford-iiit-pet/`` (splits ``test``, ``trainval``)."""
    split = _check_split(spec, ("test", "trainval"))
    listing = _require(spec, root / "annotations" / f"{split}.txt")
    images = _require(spec, root / "images", "folder")
    paths, labels, breeds = [], [], {}
    for line in listing.read_text().splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        image_id, label = fields[0], int(fields[1]) - 1
        paths.append(images / f"{image_id}.jpg")
        labels.append(label)
        # The breed is the image id without its trailing number, e.g. "great_pyrenees_102".
        breeds.setdefault(label, image_id.rsplit("_", 1)[0])
    n_classes = max(breeds) + 1 if breeds else 0
    classnames = [clean_classname(breeds[i]) for i in range(n_classes)] \
        if set(breeds) == set(range(n_classes)) else None
    if classnames:
        _check_classes(spec, n_classes, listing)
    _check_labels(spec, labels, len(spec.classnames or []) or n_classes, listing)
    return LoadedSplit(images=FileImages(paths, labels, transform, spec.name, spec.source),
                       classnames=classnames)


# -- Oxford Flowers-102 -----------------------------------------------------------------------
@loaders.register("flowers102")
def load_flowers102(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """Flowers-102 from ``flowers-102/`` (splits ``test``, ``train``, ``val``); no names on disk."""
    split = _check_split(spec, ("test", "train", "val"))
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    _require(spec, root / "jpg", "folder")
    labels_all = np.atleast_1d(_mat(spec, root / "imagelabels.mat")["labels"]).astype(np.int64) - 1
    ids = np.atleast_1d(_mat(spec, root / "setid.mat")[key]).astype(np.int64)
    paths = [root / "jpg" / f"image_{int(i):05d}.jpg" for i in ids]
    labels = [int(labels_all[int(i) - 1]) for i in ids]  # image ids count from 1
    _check_labels(spec, labels, len(spec.classnames or []) or 102, root / "imagelabels.mat")
    return LoadedSplit(images=FileImages(paths, labels, transform, spec.name, spec.source))


# -- FGVC-Aircraft ------------------------------------------------------------------------------
@loaders.register("fgvc_aircraft")
def load_fgvc_aircraft(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """FGVC-Aircraft from ``fgvc-aircraft-2013b/`` (splits ``test``, ``train``, ``val``,
    ``trainval``; ``options.level``: ``variant`` (100), ``family`` (70), ``manufacturer`` (30))."""
    split = _check_split(spec, ("test", "train", "val", "trainval"))
    level = _option(spec, "level", "variant")
    class_files = {"variant": "variants.txt", "family": "families.txt",
                   "manufacturer": "manufacturers.txt"}
    if level not in class_files:
        raise UserError(f"dataset {spec.name!r} has options.level = {level!r}",
                        f"use one of {list(class_files)}")
    data = root / "data"
    names_path = _require(spec, data / class_files[level])
    classes = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    _check_classes(spec, len(classes), names_path)
    index = {name: i for i, name in enumerate(classes)}
    listing = _require(spec, data / f"images_{level}_{split}.txt")
    paths, labels = [], []
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        image_id, name = line.strip().split(" ", 1)
        if name not in index:
            raise UserError(f"dataset {spec.name!r}: {listing} names class {name!r}, "
                            f"which {names_path} does not list", "extract the archive again")
        paths.append(data / "images" / f"{image_id}.jpg")
        labels.append(index[name])
    # TeCoA's cleaning: Boeing variants are bare numbers ("737-800"), so name the maker.
    classnames = [(f"Boeing {n}" if n[:1] == "7" else n).lower().replace("_", " ") for n in classes]
    return LoadedSplit(images=FileImages(paths, labels, transform, spec.name, spec.source),
                       classnames=classnames)


# -- Stanford Cars ------------------------------------------------------------------------------
@loaders.register("stanford_cars")
def load_stanford_cars(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """Stanford Cars from ``stanford_cars/`` (splits ``test``, ``train``)."""
    split = _check_split(spec, ("test", "train"))
    devkit = root / "devkit"
    if split == "test":
        annotations, images = root / "cars_test_annos_withlabels.mat", root / "cars_test"
    else:
        annotations, images = devkit / "cars_train_annos.mat", root / "cars_train"
    _require(spec, images, "folder")
    records = np.atleast_1d(_mat(spec, annotations)["annotations"])
    paths = [images / str(record["fname"]) for record in records]
    labels = [int(record["class"]) - 1 for record in records]  # classes count from 1
    classnames = None
    meta = devkit / "cars_meta.mat"
    if meta.exists():
        raw = [str(n) for n in np.atleast_1d(_mat(spec, meta)["class_names"])]
        # TeCoA's cleaning drops the trailing model year ("... Sedan 2012").
        classnames = [clean_classname(n[:-5] if n[-4:].isdigit() else n) for n in raw]
        _check_classes(spec, len(classnames), meta)
    _check_labels(spec, labels, len(classnames or spec.classnames or []) or 196, annotations)
    return LoadedSplit(images=FileImages(paths, labels, transform, spec.name, spec.source),
                       classnames=classnames)


# -- SUN397 ------------------------------------------------------------------------------------
@loaders.register("sun397")
def load_sun397(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """SUN397 from ``SUN397/`` (split ``all``: every image; ``train``/``test``: partition 01)."""
    split = _check_split(spec, ("all", "train", "test"))
    names_path = _require(spec, root / "ClassName.txt")
    classes = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    _check_classes(spec, len(classes), names_path)
    index = {name: i for i, name in enumerate(classes)}  # "/a/abbey", "/b/balcony/interior", ...
    paths, labels = [], []
    if split == "all":
        for name in classes:
            folder = root / name.strip("/")
            files = sorted(p for p in folder.glob("sun_*.jpg")) if folder.is_dir() else []
            paths.extend(files)
            labels.extend([index[name]] * len(files))
        if not paths:
            raise DatasetMissing(spec.name, root / classes[0].strip("/") / "sun_*.jpg",
                                 spec.source, "image files")
    else:
        filename = {"train": "Training_01.txt", "test": "Testing_01.txt"}[split]
        listing = root / filename
        if not listing.exists():
            listing = _require(spec, root / "Partitions" / filename)
        for line in listing.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            name = line.rsplit("/", 1)[0]
            if name not in index:
                raise UserError(f"dataset {spec.name!r}: {listing} lists {line!r}, whose class "
                                f"{names_path} does not list", "check the partition files")
            paths.append(root / line.lstrip("/"))
            labels.append(index[name])
    # TeCoA's cleaning: drop the "/a/" prefix, "/" and "_" become spaces.
    classnames = [clean_classname(name[3:].replace("/", " ")) for name in classes]
    return LoadedSplit(images=FileImages(paths, labels, transform, spec.name, spec.source),
                       classnames=classnames)


# -- Food-101 ----------------------------------------------------------------------------------
@loaders.register("food101")
def load_food101(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """Food-101 from ``food-101/`` (splits ``test``, ``train``)."""
    split = _check_split(spec, ("test", "train"))
    listing = _require(spec, root / "meta" / f"{split}.json")
    try:
        meta = json.loads(listing.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"dataset {spec.name!r}: {listing} is not valid JSON ({exc.msg})",
                        "extract the archive again") from None
    classes = sorted(meta)
    _check_classes(spec, len(classes), listing)
    paths, labels = [], []
    for index, name in enumerate(classes):
        for relative in meta[name]:
            paths.append(root / "images" / f"{relative}.jpg")
            labels.append(index)
    return LoadedSplit(images=FileImages(paths, labels, transform, spec.name, spec.source),
                       classnames=[clean_classname(name) for name in classes])


# -- DTD ---------------------------------------------------------------------------------------
@loaders.register("dtd")
def load_dtd(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """DTD from ``dtd/`` holding the tarball's ``dtd/`` (splits ``test``, ``train``, ``val``)."""
    split = _check_split(spec, ("test", "train", "val"))
    partition = _option(spec, "partition", 1)
    if partition not in range(1, 11):
        raise UserError(f"dataset {spec.name!r} has options.partition = {partition!r}",
                        "use an integer from 1 to 10")
    data = root / "dtd"
    listing = _require(spec, data / "labels" / f"{split}{partition}.txt")
    entries = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    # Classes are the image folders: the 47 texture names in sorted order.
    classes = sorted({entry.split("/", 1)[0] for entry in entries})
    _check_classes(spec, len(classes), listing)
    index = {name: i for i, name in enumerate(classes)}
    paths = [data / "images" / entry for entry in entries]
    labels = [index[entry.split("/", 1)[0]] for entry in entries]
    return LoadedSplit(images=FileImages(paths, labels, transform, spec.name, spec.source),
                       classnames=[clean_classname(name) for name in classes])


# -- PatchCamelyon -----------------------------------------------------------------------------
def _h5py(spec: DatasetSpec):
    try:
        import h5py
    except ImportError:
        raise UserError(f"dataset {spec.name!r} is stored as HDF5, which needs h5py",
                        "install it: pip install 'vlbench[formats]' (or h5py)") from None
    return h5py


class PCAMImages(Dataset):
    """PCAM patches read row by row from the ``x`` HDF5 file (opened lazily, once per process)."""

    def __init__(self, path: Path, targets: Sequence[int], transform: Callable | None):
        self.path = str(path)
        self.targets = [int(t) for t in targets]
        self.transform = transform or _default_transform
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self) -> dict:  # an open HDF5 handle must not cross process boundaries
        return {**self.__dict__, "_file": None, "_pid": None}

    def __getitem__(self, index: int):
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        pixels = np.asarray(self._file["x"][index], dtype=np.uint8)
        return self.transform(Image.fromarray(pixels)), self.targets[index]


@loaders.register("pcam")
def load_pcam(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """PatchCamelyon from ``pcam/`` (splits ``test``, ``train``, ``val``)."""
    split = _check_split(spec, ("test", "train", "val"))
    stem = f"camelyonpatch_level_2_split_{'valid' if split == 'val' else split}"
    images = _require(spec, root / f"{stem}_x.h5")
    targets = _require(spec, root / f"{stem}_y.h5")
    h5py = _h5py(spec)
    with h5py.File(targets, "r") as handle:
        labels = np.asarray(handle["y"]).reshape(-1).astype(np.int64).tolist()
    with h5py.File(images, "r") as handle:
        shape = handle["x"].shape
    if len(shape) != 4 or shape[0] != len(labels) or shape[3] != 3:
        raise UserError(f"dataset {spec.name!r}: {images} holds images of shape {shape} but "
                        f"{targets} {len(labels)} labels", "the files are corrupt; decompress them again")
    _check_labels(spec, labels, len(spec.classnames or []) or 2, targets)
    return LoadedSplit(images=PCAMImages(images, labels, transform))


# -- Karpathy retrieval splits --------------------------------------------------------------------
@loaders.register("karpathy")
def load_karpathy(spec: DatasetSpec, root: Path, transform=None) -> LoadedSplit:
    """Image-text retrieval from a Karpathy split file (``options.annotations``).

    Targets are image indices; ``captions[i]`` are the raw sentences of image ``i``. Every image
    of the split is kept in file order, with all its sentences (COCO has a few with more than 5).
    """
    listing = _require(spec, root / str(_option(spec, "annotations", f"dataset_{spec.name}.json")))
    try:
        images = json.loads(listing.read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"dataset {spec.name!r}: {listing} is not a Karpathy split file ({exc})",
                        "use dataset_flickr30k.json / dataset_coco.json from caption_datasets.zip") from None
    folder = root / str(_option(spec, "images", ""))
    paths, captions = [], []
    for entry in images:
        if entry.get("split") != spec.split:
            continue
        sentences = [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]
        if not sentences:
            continue
        paths.append(folder / entry.get("filepath", "") / entry["filename"])
        captions.append(sentences)
    if not paths:
        splits = sorted({str(entry.get("split")) for entry in images})
        raise UserError(f"dataset {spec.name!r}: {listing} has no images in split {spec.split!r}",
                        f"its splits are {', '.join(splits) or '(none)'}")
    # Check the image folder up front, so a missing download fails at load, not mid-run.
    _require(spec, paths[0].parent, "image folder")
    _require(spec, paths[0], "image file")
    return LoadedSplit(images=FileImages(paths, range(len(paths)), transform, spec.name, spec.source),
                       captions=captions)
