"""Loaders of the real dataset formats, on tiny files written in those formats.

Every test goes through the registry (``vlbench.data.datasets.load_dataset``) with the dataset's
root pointed at a fixture by ``$VLBENCH_ROOT_<NAME>``; tests that need fewer classes than the
shipped card lists use a one-entry card (``$VLBENCH_DATASETS_FILE``) copied from the shipped
entry with only its class names changed.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures_formats import (write_cifar10, write_cifar100, write_flowers102, write_image_folder, write_jpeg,
                              write_karpathy, write_pcam, write_stanford_cars, write_stl10)

from vlbench.data.datasets import DatasetMissing, env_root_variable, load_card, load_dataset, loaders
from vlbench.data.formats import RestrictedUnpickler, clean_classname
from vlbench.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "datasets.yaml"

CLASSIFICATION_COUNTS = {
    "cifar10": 10, "cifar100": 100, "stl10": 10, "imagenet": 1000, "caltech101": 101,
    "caltech256": 257, "oxford-pets": 37, "flowers102": 102, "fgvc-aircraft": 100,
    "stanford-cars": 196, "sun397": 397, "food101": 101, "eurosat": 10, "dtd": 47, "pcam": 2,
}
RETRIEVAL = ("flickr30k", "mscoco")


@pytest.fixture(autouse=True)
def shipped_card(monkeypatch):
    """Each test starts from the shipped card (whatever the environment says)."""
    monkeypatch.setenv("VLBENCH_DATASETS_FILE", str(SHIPPED))


def point_at(monkeypatch, name: str, path: Path) -> Path:
    monkeypatch.setenv(env_root_variable(name), str(path))
    return path


def shipped_entry(name: str) -> dict:
    return dict(yaml.safe_load(SHIPPED.read_text())["datasets"][name])


def use_card(tmp_path, monkeypatch, name: str, **changes) -> dict:
    """A one-entry card: the shipped entry of ``name`` with ``changes`` (None drops a key)."""
    entry = shipped_entry(name)
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    card = tmp_path / f"card-{name}.yaml"
    card.write_text(yaml.safe_dump({"datasets": {name: entry}}))
    monkeypatch.setenv("VLBENCH_DATASETS_FILE", str(card))
    return entry


def check_images(data, shape: tuple[int, int, int], indices=None) -> list[torch.Tensor]:
    images = []
    for i in indices if indices is not None else range(len(data.images)):
        image, _ = data.images[i]
        assert image.dtype == torch.float32 and tuple(image.shape) == shape
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        images.append(image)
    return images


def targets(data) -> list[int]:
    return [int(data.images[i][1]) for i in range(len(data.images))]


# -- the shipped card -----------------------------------------------------------------------------
def test_shipped_card_declares_the_real_datasets():
    specs = load_card(SHIPPED)
    import vlbench.data.formats  # noqa: F401  (registers the loaders)

    for name, count in CLASSIFICATION_COUNTS.items():
        spec = specs[name]
        assert spec.task == "classification" and spec.loader in loaders, name
        assert spec.classnames and len(spec.classnames) == count, name
        assert all(isinstance(c, str) and c.strip() == c and c for c in spec.classnames), name
        assert spec.templates and all("{c}" in t for t in spec.templates), name
        assert all(t.format(c="x") for t in spec.templates)  # no other format fields
        assert spec.root and spec.source and spec.reference and spec.description, name
        native = name in ("cifar10", "cifar100", "stl10")
        assert spec.transform == ("native" if native else {"resize": 256, "crop": 224}), name
    for name in RETRIEVAL:
        spec = specs[name]
        assert spec.task == "retrieval" and spec.loader == "karpathy" and spec.split == "test"
        assert spec.root and spec.source and spec.reference
    # A few names whose cleaning the card fixes (CLIP / TeCoA lineage).
    assert specs["imagenet"].classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert specs["caltech101"].classnames[:2] == ["off-center face", "centered face"]
    assert specs["fgvc-aircraft"].classnames[0] == "boeing 707-320"
    assert specs["stanford-cars"].classnames[0] == "am general hummer suv"
    assert specs["sun397"].classnames[8] == "apartment building outdoor"
    assert specs["caltech256"].classnames[-1] == "clutter"
    assert specs["pcam"].templates == ["This is a photo of {c}."]


def test_world_entries_still_parse():
    specs = load_card(SHIPPED)
    assert {"world-shape", "world-retrieval"} <= set(specs)


# -- CIFAR ------------------------------------------------------------------------------------------
CIFAR10_RAW = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10_python_batches(tmp_path, monkeypatch):
    labels = [3, 0, 9, 3, 5]
    point_at(monkeypatch, "cifar10", write_cifar10(tmp_path / "c10", labels, CIFAR10_RAW, train_batches=5))
    data = load_dataset("cifar10")
    assert len(data) == 5 and targets(data) == labels
    assert data.classnames == CIFAR10_RAW and data.templates == ["This is a photo of a {c}"]
    images = check_images(data, (3, 32, 32))
    for image, label in zip(images, labels):  # planes decoded in R, G, B order, rows top-down
        assert torch.allclose(image[0], torch.full((32, 32), 10 * label / 255))
        assert torch.allclose(image[1, :, 0], torch.arange(32) * 8 / 255)
        assert torch.allclose(image[2], torch.full((32, 32), 7 / 255))
    train = load_dataset("cifar10", split="train")
    assert len(train) == 25 and targets(train)[:5] == [(label + 1) % 10 for label in labels]


def test_cifar100_fine_and_coarse_labels(tmp_path, monkeypatch):
    card_names = shipped_entry("cifar100")["classnames"]
    raw_names = [name.replace(" ", "_") for name in card_names]  # as the meta file spells them
    root = write_cifar100(tmp_path / "c100", fine=[1, 99, 47], coarse=[1, 19, 17], fine_names=raw_names)
    point_at(monkeypatch, "cifar100", root)
    data = load_dataset("cifar100")
    assert targets(data) == [1, 99, 47] and len(data.classnames) == 100
    assert data.classnames[1] == "aquarium fish" and data.classnames[47] == "maple tree"
    check_images(data, (3, 32, 32))
    use_card(tmp_path, monkeypatch, "cifar100", classnames=None, options={"labels": "coarse"})
    coarse = load_dataset("cifar100")
    assert targets(coarse) == [1, 19, 17] and coarse.classnames[19] == "super 19"


def test_restricted_unpickler_refuses_foreign_globals(tmp_path):
    marker = tmp_path / "pwned"
    # A classic protocol-0 payload: os.system("touch <marker>").
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(eval, protocol=4))).load()
    assert not marker.exists()
    # Plain data and numpy arrays pass, in both the Python 2 (numpy.core) and numpy 2 spellings.
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps({"data": array}, protocol=4))).load()
    assert np.array_equal(loaded["data"], array)


def test_cifar_loader_rejects_a_malicious_batch(tmp_path, monkeypatch):
    root = write_cifar10(tmp_path / "c10", [0, 1], CIFAR10_RAW)
    marker = tmp_path / "pwned"
    (root / "test_batch").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    point_at(monkeypatch, "cifar10", root)
    with pytest.raises(UserError, match="os.system") as caught:
        load_dataset("cifar10")
    assert str(root / "test_batch") in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


# -- STL-10 -----------------------------------------------------------------------------------------
def test_stl10_binary_is_column_major(tmp_path, monkeypatch):
    names = shipped_entry("stl10")["classnames"]
    point_at(monkeypatch, "stl10", write_stl10(tmp_path / "stl", [0, 7, 9], names))
    data = load_dataset("stl10")
    assert targets(data) == [0, 7, 9] and data.classnames[7] == "monkey"
    for image, label in zip(check_images(data, (3, 96, 96)), [0, 7, 9]):
        assert torch.all(image[0, 0] == 1) and torch.all(image[0, 1:] == 0)  # top row, not left column
        assert torch.allclose(image[1, 1:], torch.full((95, 96), 20 * label / 255))


# -- class folders ----------------------------------------------------------------------------------
def test_imagenet_val_folders_in_wnid_order(tmp_path, monkeypatch):
    root = tmp_path / "imagenet"
    write_image_folder(root / "val", {"n01443537": 2, "n01440764": 1}, suffix=".JPEG")
    point_at(monkeypatch, "imagenet", root)
    with pytest.raises(UserError, match="1000 class names.*2 classes"):
        load_dataset("imagenet")  # the shipped card expects all 1000 wnids
    use_card(tmp_path, monkeypatch, "imagenet", classnames=["tench", "goldfish"])
    data = load_dataset("imagenet")
    assert targets(data) == [0, 1, 1] and data.classnames == ["tench", "goldfish"]
    images = check_images(data, (3, 224, 224))
    assert abs(float(images[0][0].mean()) - 0 / 255) < 0.05  # n01440764 written first (red 0)
    assert abs(float(images[1][0].mean()) - 10 / 255) < 0.05


def test_caltech101_skips_the_background_folder(tmp_path, monkeypatch):
    root = tmp_path / "caltech101"
    write_image_folder(root / "101_ObjectCategories", {"BACKGROUND_Google": 2, "Faces": 1, "accordion": 2})
    point_at(monkeypatch, "caltech101", root)
    use_card(tmp_path, monkeypatch, "caltech101", classnames=["off-center face", "accordion"])
    data = load_dataset("caltech101")
    assert targets(data) == [0, 1, 1]
    check_images(data, (3, 224, 224), indices=[0])


def test_eurosat_folders_match_the_card_names(tmp_path, monkeypatch):
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
               "PermanentCrop", "Residential", "River", "SeaLake"]
    root = tmp_path / "eurosat"
    write_image_folder(root / "2750", {name: 1 for name in folders})
    point_at(monkeypatch, "eurosat", root)
    data = load_dataset("eurosat")
    assert targets(data) == list(range(10))
    assert data.classnames[9] == "a sea or a lake"
    assert data.templates == ["A centered satellite photo of {c}."]
    check_images(data, (3, 224, 224), indices=[9])


def test_caltech256_names_from_folders(tmp_path, monkeypatch):
    root = tmp_path / "caltech256"
    write_image_folder(root / "256_ObjectCategories", {"001.ak47": 1, "253.faces-easy-101": 1})
    point_at(monkeypatch, "caltech256", root)
    use_card(tmp_path, monkeypatch, "caltech256", classnames=["ak47", "faces easy"])
    assert targets(load_dataset("caltech256")) == [0, 1]


# -- annotation-file formats ------------------------------------------------------------------------
def test_oxford_pets_test_listing(tmp_path, monkeypatch):
    root = tmp_path / "oxford-iiit-pet"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "test.txt").write_text("Abyssinian_201 1 1 1\ngreat_pyrenees_3 16 2 16\n")
    write_jpeg(root / "images" / "Abyssinian_201.jpg")
    write_jpeg(root / "images" / "great_pyrenees_3.jpg")
    point_at(monkeypatch, "oxford-pets", root)
    data = load_dataset("oxford-pets")
    assert targets(data) == [0, 15] and data.classnames[15] == "great pyrenees"
    assert data.templates == ["A photo of a {c}, a type of pet."]
    check_images(data, (3, 224, 224))


def test_food101_meta_json(tmp_path, monkeypatch):
    raw = [name.replace(" ", "_") for name in shipped_entry("food101")["classnames"]]
    root = tmp_path / "food-101"
    (root / "meta").mkdir(parents=True)
    meta = {name: [] for name in reversed(raw)}  # key order must not matter
    meta["cheese_plate"] = ["cheese_plate/1001"]
    meta["waffles"] = ["waffles/77", "waffles/78"]
    (root / "meta" / "test.json").write_text(json.dumps(meta))
    for relative in ["cheese_plate/1001", "waffles/77", "waffles/78"]:
        write_jpeg(root / "images" / f"{relative}.jpg")
    point_at(monkeypatch, "food101", root)
    data = load_dataset("food101")
    assert targets(data) == [16, 100, 100]
    assert data.classnames[16] == "cheese plate" and data.classnames[17] == "cheesecake"
    check_images(data, (3, 224, 224), indices=[0])


def test_dtd_partition_listing(tmp_path, monkeypatch):
    root = tmp_path / "dtd"
    (root / "dtd" / "labels").mkdir(parents=True)
    (root / "dtd" / "labels" / "test1.txt").write_text(
        "polka-dotted/polka-dotted_0121.jpg\nbanded/banded_0002.jpg\n")
    write_jpeg(root / "dtd" / "images" / "banded" / "banded_0002.jpg")
    write_jpeg(root / "dtd" / "images" / "polka-dotted" / "polka-dotted_0121.jpg")
    point_at(monkeypatch, "dtd", root)
    use_card(tmp_path, monkeypatch, "dtd", classnames=None)
    data = load_dataset("dtd")
    assert targets(data) == [1, 0] and data.classnames == ["banded", "polka dotted"]
    check_images(data, (3, 224, 224))


def test_sun397_whole_dataset_and_partition(tmp_path, monkeypatch):
    root = tmp_path / "SUN397"
    (root).mkdir()
    (root / "ClassName.txt").write_text("/a/abbey\n/b/balcony/interior\n")
    write_jpeg(root / "a" / "abbey" / "sun_bbb.jpg")
    write_jpeg(root / "a" / "abbey" / "sun_aaa.jpg")
    write_jpeg(root / "b" / "balcony" / "interior" / "sun_ccc.jpg")
    (root / "Partitions").mkdir()
    (root / "Partitions" / "Testing_01.txt").write_text("/b/balcony/interior/sun_ccc.jpg\n")
    point_at(monkeypatch, "sun397", root)
    use_card(tmp_path, monkeypatch, "sun397", classnames=None)
    data = load_dataset("sun397")
    assert targets(data) == [0, 0, 1] and data.classnames == ["abbey", "balcony interior"]
    assert data.images.paths[0].endswith("sun_aaa.jpg")  # sorted, so subsets are reproducible
    check_images(data, (3, 224, 224))
    test = load_dataset("sun397", split="test")
    assert targets(test) == [1]


def test_fgvc_aircraft_variants(tmp_path, monkeypatch):
    data_dir = tmp_path / "fgvc-aircraft-2013b" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "variants.txt").write_text("707-320\nA300B4\n")
    (data_dir / "images_variant_test.txt").write_text("1025794 A300B4\n0056978 707-320\n")
    write_jpeg(data_dir / "images" / "1025794.jpg")
    write_jpeg(data_dir / "images" / "0056978.jpg")
    point_at(monkeypatch, "fgvc-aircraft", data_dir.parent)
    use_card(tmp_path, monkeypatch, "fgvc-aircraft", classnames=None)
    data = load_dataset("fgvc-aircraft")
    assert targets(data) == [1, 0] and data.classnames == ["boeing 707-320", "a300b4"]
    check_images(data, (3, 224, 224))


def test_flowers102_mat_files(tmp_path, monkeypatch):
    pytest.importorskip("scipy.io")
    root = write_flowers102(tmp_path / "flowers-102", labels=[5, 102, 1], test_ids=[3, 2], train_ids=[1])
    point_at(monkeypatch, "flowers102", root)
    data = load_dataset("flowers102")
    assert targets(data) == [0, 101] and len(data.classnames) == 102
    assert data.images.paths[0].endswith("image_00003.jpg")
    check_images(data, (3, 224, 224))
    assert targets(load_dataset("flowers102", split="train")) == [4]


def test_stanford_cars_mat_files(tmp_path, monkeypatch):
    pytest.importorskip("scipy.io")
    root = write_stanford_cars(tmp_path / "stanford_cars", [("00001.jpg", 2), ("00002.jpg", 1)],
                               ["AM General Hummer SUV 2000", "Acura TL Type-S 2008"])
    point_at(monkeypatch, "stanford-cars", root)
    use_card(tmp_path, monkeypatch, "stanford-cars", classnames=None)
    data = load_dataset("stanford-cars")
    assert targets(data) == [1, 0] and data.classnames == ["am general hummer suv", "acura tl type s"]
    check_images(data, (3, 224, 224))


def test_pcam_hdf5(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    point_at(monkeypatch, "pcam", write_pcam(tmp_path / "pcam", [0, 1, 1]))
    data = load_dataset("pcam")
    assert targets(data) == [0, 1, 1]
    assert [data.templates[0].format(c=c) for c in data.classnames] == [
        "This is a photo of healthy lymph node tissue.", "This is a photo of lymph node tumor tissue."]
    images = check_images(data, (3, 224, 224))
    assert float(images[0][0].mean()) < 0.05 and float(images[1][0].mean()) > 0.7


# -- retrieval --------------------------------------------------------------------------------------
def test_flickr30k_karpathy_test_split(tmp_path, monkeypatch):
    entries = [
        {"filename": "1000092795.jpg", "split": "test", "sentences": ["Two dogs play.", "Dogs run."]},
        {"filename": "10002456.jpg", "split": "train", "sentences": ["A train caption."]},
        {"filename": "1000268201.jpg", "split": "test", "sentences": ["A child climbs.", " "]},
    ]
    root = write_karpathy(tmp_path / "flickr30k", "dataset_flickr30k.json", entries,
                          image_dir="flickr30k-images")
    point_at(monkeypatch, "flickr30k", root)
    data = load_dataset("flickr30k")
    assert data.task == "retrieval" and len(data) == 2
    assert data.captions == [["Two dogs play.", "Dogs run."], ["A child climbs."]]
    assert targets(data) == [0, 1]
    check_images(data, (3, 224, 224))
    # An image that disappears after loading is reported by path, not as a bare OSError.
    (root / "flickr30k-images" / "1000268201.jpg").unlink()
    with pytest.raises(DatasetMissing, match="1000268201.jpg"):
        data.images[1]


def test_mscoco_karpathy_uses_filepath(tmp_path, monkeypatch):
    entries = [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                "sentences": [f"caption {i}" for i in range(6)]},
               {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "val",
                "sentences": ["a val caption"]}]
    point_at(monkeypatch, "mscoco", write_karpathy(tmp_path / "mscoco", "dataset_coco.json", entries))
    data = load_dataset("mscoco")
    assert len(data) == 1 and len(data.captions[0]) == 6
    check_images(data, (3, 224, 224))


# -- missing data and bad settings --------------------------------------------------------------------
@pytest.mark.parametrize("name", [*CLASSIFICATION_COUNTS, *RETRIEVAL])
def test_missing_dataset_names_the_expected_path(tmp_path, monkeypatch, name):
    data_root = tmp_path / "empty data root"
    data_root.mkdir()
    monkeypatch.setenv("VLBENCH_DATA", str(data_root))
    monkeypatch.delenv(env_root_variable(name), raising=False)
    with pytest.raises(DatasetMissing) as caught:
        load_dataset(name)
    message = str(caught.value)
    assert f"dataset {name!r} not found" in message and str(data_root) in message
    assert env_root_variable(name) in message and "\n" not in message


def test_missing_cifar_names_the_test_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("VLBENCH_DATA", str(tmp_path))
    with pytest.raises(DatasetMissing, match="cifar-10-batches-py/test_batch"):
        load_dataset("cifar10")


def test_unsupported_split_is_a_user_error(tmp_path, monkeypatch):
    point_at(monkeypatch, "cifar10", write_cifar10(tmp_path / "c10", [0], CIFAR10_RAW))
    with pytest.raises(UserError, match="split 'val'"):
        load_dataset("cifar10", split="val")
    # Datasets without official splits keep everything in one folder: no silent "train".
    with pytest.raises(UserError, match="split 'train'"):
        load_dataset("caltech101", split="train")


def test_clean_classname_follows_tecoa():
    assert clean_classname("polka-dotted") == "polka dotted"
    assert clean_classname("Maine_Coon") == "maine coon"


# -- the same fixture files through torchvision's own dataset classes -----------------------------
def unchecked(cls):
    """A torchvision dataset class that trusts the files it is given: its integrity check
    compares md5 sums of the published archives, which a fixture cannot match."""
    return type(cls.__name__, (cls,), {"_check_integrity": lambda self: True})


def same_as_torchvision(data, reference) -> None:
    """Every label and every pixel as torchvision reads them (through the card's transform)."""
    from vlbench.data.datasets import build_transform

    transform = build_transform(data.spec.transform)
    assert len(data) == len(reference) > 0
    for i in range(len(reference)):
        image, label = reference[i]
        ours, our_label = data.images[i]
        assert int(our_label) == int(label)
        assert torch.allclose(ours, transform(image.convert("RGB")), atol=1e-6)


@pytest.mark.parametrize("name, folder, torchvision_class, options", [
    ("cifar10", "cifar-10-batches-py", "CIFAR10", {"train": False}),
    ("cifar100", "cifar-100-python", "CIFAR100", {"train": False}),
    ("stl10", "stl10_binary", "STL10", {"split": "test"}),
    ("flowers102", "flowers-102", "Flowers102", {"split": "test"}),
    ("pcam", "pcam", "PCAM", {"split": "test"}),
])
def test_loaders_read_what_torchvision_reads(tmp_path, monkeypatch, name, folder, torchvision_class, options):
    import torchvision.datasets
    import torchvision.datasets.cifar

    target = tmp_path / folder
    if name == "cifar10":
        write_cifar10(target, [3, 0, 9, 3, 5], CIFAR10_RAW)
    elif name == "cifar100":
        names = [n.replace(" ", "_") for n in shipped_entry("cifar100")["classnames"]]
        write_cifar100(target, fine=[1, 99, 47], coarse=[1, 19, 17], fine_names=names)
    elif name == "stl10":
        write_stl10(target, [0, 7, 9], shipped_entry("stl10")["classnames"])
    elif name == "flowers102":
        write_flowers102(target, labels=[5, 102, 1], test_ids=[3, 2], train_ids=[1])
    else:
        write_pcam(target, [0, 1, 1])
    point_at(monkeypatch, name, target)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)  # md5s
    reference = unchecked(getattr(torchvision.datasets, torchvision_class))(str(tmp_path), download=False, **options)
    same_as_torchvision(load_dataset(name), reference)
