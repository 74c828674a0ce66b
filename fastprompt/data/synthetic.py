"""A built-in image dataset drawn procedurally: several visually distinct classes (a shape, a colour, a
texture), every image deterministic from (seed, split, index), no files. It is the default data of
`fastprompt train`, so that the main command runs anywhere, offline, in about a minute on a CPU."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

# (class name, shape, RGB colour): names a text encoder can relate to, looks that differ at 32 pixels
CLASSES = [
    ("red circle", "circle", (0.9, 0.1, 0.1)),
    ("green square", "square", (0.1, 0.8, 0.2)),
    ("blue triangle", "triangle", (0.15, 0.3, 0.95)),
    ("yellow cross", "cross", (0.95, 0.9, 0.1)),
    ("purple ring", "ring", (0.6, 0.1, 0.8)),
    ("orange stripes", "stripes", (1.0, 0.55, 0.05)),
    ("cyan checkerboard", "checker", (0.1, 0.85, 0.9)),
    ("white dots", "dots", (0.95, 0.95, 0.95)),
    ("black diamond", "diamond", (0.05, 0.05, 0.05)),
    ("pink star", "star", (1.0, 0.45, 0.7)),
]
SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


def _shape_mask(kind: str, yy, xx, cy, cx, r, angle):
    dy, dx = yy - cy, xx - cx
    # rotate the frame by `angle`
    ry = dy * math.cos(angle) - dx * math.sin(angle)
    rx = dy * math.sin(angle) + dx * math.cos(angle)
    dist = torch.sqrt(dy ** 2 + dx ** 2)
    if kind == "circle":
        return dist < r
    if kind == "ring":
        return (dist < r) & (dist > 0.6 * r)
    if kind == "square":
        return (ry.abs() < 0.8 * r) & (rx.abs() < 0.8 * r)
    if kind == "diamond":
        return (ry.abs() + rx.abs()) < r
    if kind == "cross":
        return ((ry.abs() < 0.3 * r) & (rx.abs() < r)) | ((rx.abs() < 0.3 * r) & (ry.abs() < r))
    if kind == "triangle":
        return (ry < 0.7 * r) & (ry > -r + 2 * rx.abs())
    if kind == "star":
        theta = torch.atan2(ry, rx)
        return dist < r * (0.55 + 0.45 * torch.cos(5 * theta).clamp(min=0))
    if kind == "stripes":
        return torch.sin(rx * (6.0 / r)) > 0.2
    if kind == "checker":
        return (torch.floor(ry / (0.6 * r)) + torch.floor(rx / (0.6 * r))) % 2 == 0
    if kind == "dots":
        return (torch.sin(ry * (7.0 / r)) * torch.sin(rx * (7.0 / r))) > 0.55
    raise ValueError(kind)


def draw(label: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """One image of class `label`, (3, size, size) in [0, 1]: a random dim background with noise, the class's
    shape in its colour at a random place, scale and angle, the colour jittered."""
    _, kind, colour = CLASSES[label]
    u = torch.rand(8, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    r = size * (0.22 + 0.15 * u[0])
    cy, cx = size * (0.35 + 0.3 * u[1]), size * (0.35 + 0.3 * u[2])
    mask = _shape_mask(kind, yy, xx, cy, cx, r, float(u[3]) * math.pi).float()
    background = 0.25 + 0.25 * u[4:7, None, None] + 0.08 * torch.randn(3, size, size, generator=generator)
    rgb = torch.tensor(colour)[:, None, None] * (0.85 + 0.3 * u[7]) + 0.05 * torch.randn(3, 1, 1,
                                                                                           generator=generator)
    return (background * (1 - mask) + rgb * mask).clamp(0, 1)


class SyntheticShapes(Dataset):
    """`per_class` images of each of the first `n_classes` classes for a split; items are (image, label),
    the image normalised by `normalize` (a callable on a (3, H, W) tensor in [0, 1]) when given."""

    def __init__(self, n_classes: int = 8, per_class: int = 32, image_size: int = 32, split: str = "train",
                 seed: int = 0, normalize=None):
        if not 2 <= n_classes <= len(CLASSES):
            raise ValueError(f"the built-in dataset has 2 to {len(CLASSES)} classes, not {n_classes}")
        if split not in SPLIT_SALT:
            raise ValueError(f"split must be one of {list(SPLIT_SALT)}, got {split!r}")
        self.classnames = [name for name, _, _ in CLASSES[:n_classes]]
        self.labels = [i % n_classes for i in range(n_classes * per_class)]
        self.image_size, self.split, self.seed, self.normalize = image_size, split, seed, normalize

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Every training set takes the epoch (RecordDataset draws its augmentation from it); these images
        are the same in every epoch."""

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + SPLIT_SALT[self.split] * 10_007 + index)
        image = draw(self.labels[index], self.image_size, g)
        return (self.normalize(image) if self.normalize else image), self.labels[index]
