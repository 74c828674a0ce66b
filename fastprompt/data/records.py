"""Image datasets on disk, as the prompt-learning field lays them out, read into records (path, label,
class name): CoOp / Dassl `split_*.json` files and ImageFolder trees; K-shot sampling and the base / new
class split of the field.

split_*.json (CoOp's 11 datasets): {"train": [[relative image path, label, class name], ...], "val": [...],
"test": [...]}; the paths are relative to the dataset's image folder (for example `images/` or `jpg/`),
found here by trying the folder itself and its subfolders.
ImageFolder: DIR/{train,val,test}/<class>/<image>, or DIR/<class>/<image> split by a seeded draw.
ImageNet family (CoOp's layout): DIR/classnames.txt ("<wnid> <class name>" per line, the 1000 classes in label
order) beside the images: ImageNet's DIR/images/{train,val}/<wnid>/ (val is the test set), and the
evaluation-only variants: ImageNet-Sketch DIR/images/<wnid>/, ImageNet-A and -R DIR/imagenet-a/<wnid>/ and
DIR/imagenet-r/<wnid>/ (200 of the classes: the run's classes are the folders present, in classnames.txt
order), ImageNet-V2 DIR/imagenetv2-matched-frequency-format-val/<label 0-999>/.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Optional

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class Record:
    path: str
    label: int
    classname: str


@dataclass
class RecordSplits:
    """train / val / test records and the class names by label."""

    train: list
    val: list
    test: list
    classnames: list


class DataError(ValueError):
    """Data that cannot be used as given; the message says what and where."""


def _classnames(records: list) -> list:
    names = {}
    for r in records:
        names.setdefault(r.label, r.classname)
    if sorted(names) != list(range(len(names))):
        raise DataError(f"labels must run from 0 to {len(names) - 1} without gaps, got {sorted(names)[:10]}...")
    return [names[i] for i in range(len(names))]


def _split_items(path: str, name: str, items) -> list:
    """A split's [image path, label, class name] entries, checked."""
    if not isinstance(items, list):
        raise DataError(f"{path}: {name!r} must be a list of [image path, label, class name], got "
                        f"{type(items).__name__}")
    for number, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0):
            raise DataError(f"{path}: {name}[{number}] must be [image path, label >= 0, class name], got {item!r}")
    return items


def read_split_json(path: str, image_dir: Optional[str] = None) -> RecordSplits:
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as exc:
        raise DataError(f"cannot read the split file {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a split file: expected an object with train / val / test lists")
    missing = [k for k in ("train", "test") if k not in raw]
    if missing:
        raise DataError(f"{path} lacks the {missing} lists of a split file")
    items = {name: _split_items(path, name, raw.get(name, [])) for name in ("train", "val", "test")}
    if not items["train"]:
        raise DataError(f"{path} lists no training images")
    if image_dir is not None and not os.path.isdir(image_dir):
        raise DataError(f"the image folder {image_dir!r} does not exist")
    root = image_dir or _find_image_dir(os.path.dirname(os.path.abspath(path)), items["train"][0][0])
    splits = {}
    for name in ("train", "val", "test"):
        splits[name] = [Record(os.path.join(root, p), y, str(c).replace("_", " ")) for p, y, c in items[name]]
    classnames = _classnames(splits["train"] + splits["val"] + splits["test"])
    return RecordSplits(splits["train"], splits["val"], splits["test"], classnames)


def _find_image_dir(root: str, example: str) -> str:
    candidates = [root] + sorted(os.path.join(root, d) for d in os.listdir(root)
                                 if os.path.isdir(os.path.join(root, d)))
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, example)):
            return candidate
    raise DataError(f"the split file names {example!r}, found neither in {root} nor in its subfolders; give the "
                    "image folder explicitly")


def _images_by_class(folder: str) -> dict:
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise DataError(f"{folder} has no class subfolders (expected {folder}/<class>/<image>)")
    out = {}
    for c in classes:
        files = sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_SUFFIXES))
        out[c] = [os.path.join(folder, c, f) for f in files]
    return out


def read_image_folder(root: str, seed: int = 1, test_fraction: float = 0.2) -> RecordSplits:
    """DIR/{train,val,test}/<class>/... when present, else DIR/<class>/... with test_fraction of each class
    drawn (seeded) for testing."""
    if os.path.isdir(os.path.join(root, "train")):
        by_split = {s: _images_by_class(os.path.join(root, s)) for s in ("train", "val", "test")
                    if os.path.isdir(os.path.join(root, s))}
        classes = sorted(by_split["train"])
        index = {c: i for i, c in enumerate(classes)}
        splits = {s: [] for s in ("train", "val", "test")}
        for s, groups in by_split.items():
            for c, paths in groups.items():
                if c not in index:
                    raise DataError(f"{root}/{s} has a class {c!r} that {root}/train lacks")
                splits[s] += [Record(p, index[c], c.replace("_", " ")) for p in paths]
        return RecordSplits(splits["train"], splits["val"], splits["test"], [c.replace("_", " ") for c in classes])
    groups = _images_by_class(root)
    rng = random.Random(seed)
    train, test = [], []
    for label, (c, paths) in enumerate(groups.items()):
        paths = paths[:]
        rng.shuffle(paths)
        n_test = max(1, round(test_fraction * len(paths))) if len(paths) > 1 else 0
        test += [Record(p, label, c.replace("_", " ")) for p in paths[:n_test]]
        train += [Record(p, label, c.replace("_", " ")) for p in paths[n_test:]]
    return RecordSplits(train, [], test, [c.replace("_", " ") for c in groups])


WNID = re.compile(r"^n\d{8}$")
CLASSNAMES_FILE = "classnames.txt"


def read_classnames_file(path: str) -> list:
    """CoOp's ImageNet classnames.txt: [(wnid, class name), ...] in label order."""
    entries, seen = [], set()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            wnid, _, name = line.partition(" ")
            if not WNID.match(wnid) or not name.strip():
                raise DataError(f"{path}:{number}: expected '<wnid> <class name>' (such as 'n01440764 tench'), "
                                f"got {line!r}")
            if wnid in seen:
                raise DataError(f"{path}:{number}: {wnid} is listed twice")
            seen.add(wnid)
            entries.append((wnid, name.strip()))
    if not entries:
        raise DataError(f"{path} lists no classes")
    return entries


def _subfolders(folder: str) -> list:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def _class_folder_kind(folder: str) -> Optional[str]:
    """"wnid" or "label" when every subfolder of `folder` is named so (files such as a README are ignored)."""
    names = _subfolders(folder)
    if names and all(WNID.match(n) for n in names):
        return "wnid"
    if names and all(n.isdigit() for n in names):
        return "label"
    return None


def _imagenet_records(folder: str, kind: str, entries: list, path: str) -> tuple[list, list]:
    """Records of one folder of class folders and the class names their labels index."""
    wnids = [w for w, _ in entries]
    present = _subfolders(folder)
    if kind == "label":  # ImageNet-V2: folders are the labels of the 1000 classes
        labels = {d: int(d) for d in present}
        wrong = [d for d, y in labels.items() if y >= len(entries)]
        if wrong:
            raise DataError(f"{folder} has class folders {wrong[:5]} beyond the {len(entries)} classes of {path}")
        classnames = [name for _, name in entries]
    else:
        unknown = sorted(set(present) - set(wnids))
        if unknown:
            raise DataError(f"{folder} has class folders {unknown[:5]} that {path} does not list")
        kept = [w for w in wnids if w in set(present)]  # a subset (ImageNet-A / -R): relabelled in list order
        labels = {w: i for i, w in enumerate(kept)}
        names = dict(entries)
        classnames = [names[w] for w in kept]
    records = []
    for d in present:
        files = sorted(f for f in os.listdir(os.path.join(folder, d)) if f.lower().endswith(IMAGE_SUFFIXES))
        records += [Record(os.path.join(folder, d, f), labels[d], classnames[labels[d]]) for f in files]
    return records, classnames


def read_imagenet_family(root: str) -> RecordSplits:
    """ImageNet or one of its variants in CoOp's layout (module docstring). ImageNet gives train and test (its
    val folder); a variant gives test only, its classes those of its folders."""
    path = os.path.join(root, CLASSNAMES_FILE)
    entries = read_classnames_file(path)
    images = os.path.join(root, "images")
    if os.path.isdir(os.path.join(images, "train")):
        if not os.path.isdir(os.path.join(images, "val")):
            raise DataError(f"{images} has train/ but no val/ (ImageNet's val images are the test set)")
        for split in ("train", "val"):
            if _class_folder_kind(os.path.join(images, split)) != "wnid":
                raise DataError(f"{images}/{split} must hold one folder per class named by its wnid (n01440764/...)")
        train, classnames = _imagenet_records(os.path.join(images, "train"), "wnid", entries, path)
        test, test_names = _imagenet_records(os.path.join(images, "val"), "wnid", entries, path)
        if test_names != classnames:
            raise DataError(f"{images}/train and {images}/val hold different classes")
        return RecordSplits(train, [], test, classnames)
    candidates = [images, root] + [os.path.join(root, d) for d in _subfolders(root) if d != "images"]
    for folder in candidates:
        kind = _class_folder_kind(folder) if os.path.isdir(folder) else None
        if kind:
            test, classnames = _imagenet_records(folder, kind, entries, path)
            return RecordSplits([], [], test, classnames)
    raise DataError(f"{root} has {CLASSNAMES_FILE} but no images in an ImageNet layout: expected images/train/<wnid>/ "
                    "and images/val/<wnid>/ (ImageNet), or one folder of <wnid>/ (Sketch, -A, -R) or <label>/ "
                    "(ImageNet-V2) class folders")


def read_dataset(root: str, split_file: Optional[str] = None, image_dir: Optional[str] = None,
                 seed: int = 1) -> RecordSplits:
    """A dataset directory: its split_*.json when it has one (or `split_file`), else an ImageNet-family folder
    when it has classnames.txt, else an ImageFolder tree."""
    if not os.path.isdir(root):
        raise DataError(f"the data directory {root!r} does not exist")
    if split_file is None:
        found = sorted(f for f in os.listdir(root) if f.startswith("split_") and f.endswith(".json"))
        if len(found) > 1:
            raise DataError(f"{root} has several split files {found}: choose one with split_file")
        split_file = os.path.join(root, found[0]) if found else None
    if split_file:
        return read_split_json(split_file, image_dir)
    if os.path.isfile(os.path.join(root, CLASSNAMES_FILE)):
        return read_imagenet_family(root)
    wnid_folders = [f for f in [root] + [os.path.join(root, d) for d in _subfolders(root)]
                    if _class_folder_kind(f) == "wnid"]
    if wnid_folders:  # an ImageNet variant without its class names would train on "n01440764" as a name
        raise DataError(f"{wnid_folders[0]} has class folders named by wnid but {root} has no {CLASSNAMES_FILE}: "
                        "copy ImageNet's classnames.txt ('<wnid> <class name>' per line) into it")
    return read_image_folder(root, seed)


def few_shot(records: list, shots: int, seed: int) -> list:
    """Exactly `shots` records of every class, drawn with `seed` (the same draw for the same seed)."""
    if shots <= 0:
        return list(records)
    by_label: dict = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_label):
        items = by_label[label]
        if len(items) < shots:
            raise DataError(f"class {items[0].classname!r} has {len(items)} training images, fewer than the "
                            f"{shots} shots asked for")
        out += rng.sample(items, shots)
    return out


def subsample_classes(records: list, classnames: list, which: str) -> tuple[list, list]:
    """The field's base-to-new split (CoCoOp): the classes sorted by label, the first ⌈n/2⌉ are base, the rest
    new; the kept classes are relabelled from 0. which: "all", "base" or "new"."""
    if which == "all":
        return list(records), list(classnames)
    n = len(classnames)
    m = math.ceil(n / 2)
    kept = list(range(m)) if which == "base" else list(range(m, n))
    if which not in ("base", "new"):
        raise ValueError(f"which must be all, base or new, not {which!r}")
    relabel = {y: i for i, y in enumerate(kept)}
    out = [Record(r.path, relabel[r.label], r.classname) for r in records if r.label in relabel]
    return out, [classnames[y] for y in kept]
