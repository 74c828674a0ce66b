"""The hand-written prompt template of each dataset, as CoOp's code gives them (its zero-shot CLIP trainer; the
same table in DPT's code), and how a run finds its dataset.

Zero-shot CLIP, DPT (its frozen template text features), TMML (its frozen class features) and MAP-DAFE (the
text its prompts follow) read the template of the dataset they run on unless one is given: the trainer picks
it from the dataset's folder name or split file name (`template_for`). Methods whose public code uses one
fixed template (VPT-deep's "a photo of a {}.") keep theirs.
"""

from __future__ import annotations

import os
import re
from typing import Optional

DEFAULT_TEMPLATE = "a photo of a {}."

# dataset (as CoOp / Dassl name it) -> template; "{}" is the class name
DATASET_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# The names a dataset's folder or split file goes by, lower-cased with everything but letters and digits
# removed: Dassl's class names (the split files' split_zhou_<Name>.json), CoOp's DATASETS.md folders
# (oxford_pets, caltech-101, imagenet-adversarial, ...) and the folders of DPT's train_single.sh (Flowers102,
# FGVC/fgvc-aircraft-2013b, ImageNet1K, ...).
ALIASES = {
    "oxfordpets": "OxfordPets", "pets": "OxfordPets",
    "oxfordflowers": "OxfordFlowers", "flowers102": "OxfordFlowers", "flowers": "OxfordFlowers",
    "fgvcaircraft": "FGVCAircraft", "fgvcaircraft2013b": "FGVCAircraft", "aircraft": "FGVCAircraft",
    "describabletextures": "DescribableTextures", "dtd": "DescribableTextures",
    "eurosat": "EuroSAT",
    "stanfordcars": "StanfordCars", "cars": "StanfordCars",
    "food101": "Food101",
    "sun397": "SUN397",
    "caltech101": "Caltech101",
    "ucf101": "UCF101",
    "imagenet": "ImageNet", "imagenet1k": "ImageNet",
    "imagenetsketch": "ImageNetSketch",
    "imagenetv2": "ImageNetV2",
    "imageneta": "ImageNetA", "imagenetadversarial": "ImageNetA",
    "imagenetr": "ImageNetR", "imagenetrendition": "ImageNetR",
}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def dataset_name(data: Optional[str], split_file: Optional[str] = None) -> Optional[str]:
    """The dataset a run reads, by its split file's name (split_zhou_EuroSAT.json, split_EuroSAT.json), else
    its folder's name, else the folder above (DPT's FGVC/fgvc-aircraft-2013b); None when none is known."""
    names = []
    if split_file:
        stem = os.path.splitext(os.path.basename(split_file))[0]
        names.append(re.sub(r"^split_(zhou_)?", "", stem))
    if data:
        folder = os.path.normpath(os.path.abspath(data))
        names += [os.path.basename(folder), os.path.basename(os.path.dirname(folder))]
        if split_file is None and os.path.isdir(folder):  # the split file the reader will pick
            found = sorted(f for f in os.listdir(folder) if f.startswith("split_") and f.endswith(".json"))
            names[:0] = [re.sub(r"^split_(zhou_)?", "", os.path.splitext(f)[0]) for f in found[:1]]
    for name in names:
        if _key(name) in ALIASES:
            return ALIASES[_key(name)]
    return None


def template_for(data: Optional[str], split_file: Optional[str] = None) -> str:
    """The dataset's hand-written template, or "a photo of a {}." for a dataset the table does not hold (and
    for the built-in shapes)."""
    name = dataset_name(data, split_file)
    return DATASET_TEMPLATES[name] if name else DEFAULT_TEMPLATE


def check_template(method: str, template, ensemble: bool = False) -> list:
    """A template (or, with `ensemble`, a list of them: zero-shot CLIP averages them) as a list; each must hold
    the class name as one "{}"."""
    templates = [template] if isinstance(template, str) else list(template or [])
    if not templates:
        raise ValueError(f"{method}: no template given")
    if len(templates) > 1 and not ensemble:
        raise ValueError(f"{method}: takes one template, got {len(templates)}")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"{method}: a template holds the class name as one {{}}, got {t!r}")
    return templates
