"""Data for the training harness: the built-in procedural dataset, datasets on disk (split_*.json,
ImageNet-family folders or ImageFolder), K-shot sampling, the base / new split, and CLIP preprocessing taken
from the model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from .records import (DataError, Record, RecordSplits, few_shot, read_classnames_file, read_dataset, read_image_folder,
                      read_imagenet_family, read_split_json, subsample_classes)
from .synthetic import SyntheticShapes


TRAIN_AUGMENTATION = ("random_resized_crop", "random_flip", "normalize")


def clip_transforms(model, augmentation=TRAIN_AUGMENTATION):
    """(train, eval) preprocessing of the model: its size, mean and std, bicubic; for training the listed
    augmentations by Dassl's INPUT.TRANSFORMS names (the CoOp recipe: random resized crop at scale (0.08, 1),
    flip, normalisation; without random_resized_crop a resize to the square size, as Dassl), for evaluation a
    resize of the short side and a centre crop."""
    import open_clip
    from torchvision import transforms as T

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    bicubic = T.InterpolationMode.BICUBIC
    to_rgb = T.Lambda(lambda im: im.convert("RGB"))
    train = [to_rgb, T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic)
             if "random_resized_crop" in augmentation else T.Resize((size, size), interpolation=bicubic)]
    train += [T.RandomHorizontalFlip()] if "random_flip" in augmentation else []
    train += [T.ToTensor()] + ([T.Normalize(mean, std)] if "normalize" in augmentation else [])
    evaluate = T.Compose([to_rgb, T.Resize(size, interpolation=bicubic), T.CenterCrop(size),
                          T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose(train), evaluate


def clip_normalize(model):
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))[:, None, None]
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD))[:, None, None]
    return lambda image: (image - mean) / std


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training image's random augmentation: a function of the run's seed, the epoch and the
    image's index only, so the crops and flips of a run do not depend on the number of DataLoader workers,
    on the number of ranks, or on where a resumed run restarted."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63)


class RecordDataset(Dataset):
    """Records read as (image, label); an unreadable image is an error that names the file.

    With `seed` (the training set), the transform runs under torch's CPU generator seeded from
    augmentation_seed(seed, epoch, index) and the caller's generator state is left as it was; `set_epoch`
    picks the epoch (the trainer calls it before each epoch's DataLoader starts its workers)."""

    def __init__(self, records: list, transform, seed: Optional[int] = None):
        self.records, self.transform, self.seed, self.epoch = list(records), transform, seed, 0
        self.labels = [r.label for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        record = self.records[index]
        try:
            with Image.open(record.path) as image:
                image.load()
                if self.seed is None:
                    return self.transform(image), record.label
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(augmentation_seed(self.seed, self.epoch, index))
                    return self.transform(image), record.label
        except (OSError, UnidentifiedImageError) as exc:
            raise _unreadable(record, exc) from exc


def _unreadable(record: Record, exc: Exception) -> DataError:
    return DataError(f"cannot read image {record.path} (class {record.classname!r}): {exc}")


_READABLE: set = set()  # (path, size, mtime) of images found readable in this process (protocols reuse them)


def check_images(records: list) -> None:
    """Every record's file exists and is an image PIL can identify (its header is read, not the pixels), so a
    missing or broken file is found when the dataset is opened, before the first step rather than in the
    middle of an epoch; DataError names the first bad one. A file already checked in this process (unchanged
    since) is not read again: a protocol opens the same images for every run."""
    from PIL import Image, UnidentifiedImageError

    for record in records:
        try:
            info = os.stat(record.path)
            key = (record.path, info.st_size, info.st_mtime_ns)
            if key in _READABLE:
                continue
            with Image.open(record.path):
                pass
        except (OSError, UnidentifiedImageError) as exc:
            raise _unreadable(record, exc) from exc
        _READABLE.add(key)


@dataclass
class TaskData:
    """What a run trains and evaluates on. `evaluations` maps a name ("test", or "base" and "new" for
    base-to-new) to (dataset, class names)."""

    train: Dataset
    classnames: list
    evaluations: dict
    description: str


@dataclass
class TaskRecords:
    """What a run on a dataset on disk reads, before any image is: the K-shot training records and class names,
    and the records and class names of each evaluation."""

    train: list
    classnames: list
    evaluations: dict
    description: str


def task_records(data: str, *, shots: int = 16, seed: int = 1, subsample: str = "all",
                 split_file: Optional[str] = None, image_dir: Optional[str] = None,
                 train: bool = True) -> TaskRecords:
    """The records of a run on a dataset on disk (build_task), every one checked readable (check_images).
    train False: the evaluation sets alone (a protocol's target, never trained on), so that its training
    images are neither listed into shots nor opened."""
    splits = read_dataset(data, split_file, image_dir, seed)
    train_records = few_shot(splits.train, shots, seed) if train else []
    if subsample == "all":
        task = TaskRecords(train_records, splits.classnames, {"test": (splits.test, splits.classnames)},
                           f"{data}: {len(splits.classnames)} classes, {shots} shots, seed {seed}")
    else:
        evaluations = {which: subsample_classes(splits.test, splits.classnames, which) for which in ("base", "new")}
        train_records, names = subsample_classes(train_records, splits.classnames, subsample)
        task = TaskRecords(train_records, names, evaluations,
                           f"{data}: {subsample} classes ({len(names)}), {shots} shots, seed {seed}")
    check_images(task.train + [r for records, _ in task.evaluations.values() for r in records])
    return task


def build_task(model, data: Optional[str] = None, *, shots: int = 16, seed: int = 1, subsample: str = "all",
               split_file: Optional[str] = None, image_dir: Optional[str] = None, synthetic_classes: int = 8,
               synthetic_test_per_class: int = 16, augmentation=TRAIN_AUGMENTATION, train: bool = True) -> TaskData:
    """The train set (K shots per class, seeded) and evaluation sets of a run.

    data None: the built-in procedural dataset at the model's image size (shots >= 1). subsample "base" trains
    on the base half of the classes and evaluates on base and new (the base-to-new protocol); "new" or "all"
    likewise. On disk, shots 0 takes every training image, and every image the run will read is checked
    readable here, before training (check_images). augmentation: the training transforms of images on disk
    (clip_transforms); the built-in shapes are drawn without augmentation. train False (on disk): the
    evaluation sets alone, the train set empty (task_records).
    """
    if data is None:
        if shots < 1:
            raise DataError(f"the built-in shapes are drawn per class: shots must be at least 1, got {shots}")
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        norm = clip_normalize(model)
        per_class = shots
        train = SyntheticShapes(synthetic_classes, per_class, size, "train", seed, norm)
        test = SyntheticShapes(synthetic_classes, synthetic_test_per_class, size, "test", seed, norm)
        names = train.classnames
        if subsample == "all":
            return TaskData(train, names, {"test": (test, names)},
                            f"built-in shapes: {synthetic_classes} classes, {per_class} shots, seed {seed}")
        return _subsample_synthetic(train, test, names, subsample, seed)
    task = task_records(data, shots=shots, seed=seed, subsample=subsample, split_file=split_file,
                        image_dir=image_dir, train=train)
    train_tf, eval_tf = clip_transforms(model, augmentation)
    return TaskData(RecordDataset(task.train, train_tf, seed), task.classnames,
                    {name: (RecordDataset(records, eval_tf), names) for name, (records, names) in
                     task.evaluations.items()}, task.description)


class _Relabelled(Dataset):
    def __init__(self, dataset, keep: list):
        self.dataset = dataset
        self.index = [i for i, y in enumerate(dataset.labels) if y in keep]
        self.map = {y: i for i, y in enumerate(keep)}
        self.labels = [self.map[dataset.labels[i]] for i in self.index]

    def __len__(self):
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, i):
        image, label = self.dataset[self.index[i]]
        return image, self.map[label]


def _subsample_synthetic(train, test, names, subsample, seed):
    import math

    m = math.ceil(len(names) / 2)
    base, new = list(range(m)), list(range(m, len(names)))
    trained = base if subsample == "base" else new
    return TaskData(_Relabelled(train, trained), [names[i] for i in trained],
                    {"base": (_Relabelled(test, base), [names[i] for i in base]),
                     "new": (_Relabelled(test, new), [names[i] for i in new])},
                    f"built-in shapes, {subsample} classes, seed {seed}")


__all__ = ["DataError", "Record", "RecordDataset", "RecordSplits", "SyntheticShapes", "TaskData", "TaskRecords",
           "augmentation_seed", "build_task", "check_images", "clip_normalize", "clip_transforms", "few_shot",
           "read_classnames_file", "read_dataset", "read_image_folder", "read_imagenet_family", "read_split_json",
           "subsample_classes", "task_records"]
