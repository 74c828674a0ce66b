"""Per-dataset templates (CoOp's table, picked from the dataset's folder or split file name) and zero-shot CLIP,
the baseline row: its logits, a run of it, `fastprompt eval` and a protocol."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastprompt import cli, methods
from fastprompt.methods.templates import DATASET_TEMPLATES, dataset_name, template_for
from fastprompt.train import TrainConfig, read_metrics
from fastprompt.train.trainer import method_config

from ..method_helpers import CLASSNAMES, assert_same, batch, build, clip_logits, tokenize, tiny_clip


@pytest.mark.parametrize("folder,split,expected", [
    ("eurosat", None, "a centered satellite photo of {}."),                   # CoOp's DATASETS.md folders
    ("oxford_pets", None, "a photo of a {}, a type of pet."),
    ("food-101", None, "a photo of {}, a type of food."),
    ("imagenet-adversarial", None, "a photo of a {}."),
    ("my_data", "split_zhou_DescribableTextures.json", "{} texture."),       # the split file's dataset
    ("FGVC/fgvc-aircraft-2013b", None, "a photo of a {}, a type of aircraft."),  # DPT's train_single.sh folders
    ("Flowers102", None, "a photo of a {}, a type of flower."),
    ("UCF101", None, "a photo of a person doing {}."),
    ("somewhere_else", None, "a photo of a {}."),                            # unknown: the generic template
])
def test_the_template_comes_from_the_dataset(tmp_path, folder, split, expected):
    root = tmp_path / folder
    root.mkdir(parents=True)
    if split:
        (root / split).write_text("{}")
    assert template_for(str(root)) == expected
    assert template_for(None) == "a photo of a {}."  # the built-in shapes
    assert len(DATASET_TEMPLATES) == 15  # CoOp's 11 datasets and the 4 ImageNet variants


def test_the_trainer_gives_the_dataset_template_to_the_methods_that_read_one(tmp_path):
    data = str(tmp_path / "eurosat")
    for name in ("zeroshot", "dpt", "tmml", "map_dafe"):
        assert method_config(TrainConfig(method=name, data=data))["template"] == "a centered satellite photo of {}."
        given = TrainConfig(method=name, data=data, method_config={"template": "itap of a {}."})
        assert method_config(given)["template"] == "itap of a {}."  # given: kept
    assert dataset_name(data) == "EuroSAT"
    for name in ("vpt_deep", "coop", "maple"):  # VPT-deep keeps its public code's fixed "a photo of a {}."
        assert "template" not in method_config(TrainConfig(method=name, data=data))


def _template_features(clip, template, names):
    return clip.encode_text(tokenize([template.format(n.replace("_", " ")) for n in names], clip))


def test_the_methods_use_the_template_they_are_given():
    template = "a centered satellite photo of {}."
    clip = tiny_clip()
    with torch.no_grad():
        want = _template_features(clip, template, CLASSNAMES)
        dpt = build("dpt", template=template)
        assert_same(dpt.fixed_text_features, want, "DPT's template text features")
        tmml = build("tmml", template=template)
        assert_same(tmml.class_features, F.normalize(want, dim=-1), "TMML's class features")
    dafe = build("map_dafe", template=template)
    ids = dafe.prompts.ids[0]
    text = tokenize([template.format("dog")], clip)[0]
    n = int((text != 0).sum()) - 1  # SOT + the template's tokens, without EOT
    assert torch.equal(ids[:n], text[:n])  # MAP-DAFE's text before its prompts
    with pytest.raises(ValueError, match="holds the class name as one"):
        build("dpt", template="a photo")


def test_zeroshot_logits_are_clips():
    method = methods.build("zeroshot", tiny_clip(), CLASSNAMES, template="a photo of a {}, a type of pet.")
    images, labels = batch()
    clip = method.clip.model
    with torch.no_grad():
        want = clip_logits(clip, clip.encode_image(images), _template_features(clip, "a photo of a {}, a type of pet.",
                                                                                CLASSNAMES))
        assert_same(method(images), want, "zero-shot logits")
        ensemble = methods.build("zeroshot", tiny_clip(), CLASSNAMES, template=["a photo of a {}.", "art of the {}."])
        text = sum(F.normalize(_template_features(clip, t, CLASSNAMES), dim=-1)
                   for t in ["a photo of a {}.", "art of the {}."])
        assert_same(ensemble(images), clip_logits(clip, clip.encode_image(images), text), "ensemble logits")
    assert method.state_dict() == {} and method.trainable_parameters() == []
    assert "zeroshot" not in methods.METHODS  # a baseline: the training-step tests go through METHODS


def _image_folder(root, classes, per_class):
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            Image.new("RGB", (12, 12), color=(30 * i, 90, 200 - 60 * classes.index(c))).save(
                os.path.join(root, c, f"{i}.png"))


def test_zeroshot_runs_evaluates_and_reports_the_baseline_row(tmp_path, capsys):
    data = str(tmp_path / "eurosat")
    _image_folder(data, ["annual crop", "forest", "river"], 5)
    out = str(tmp_path / "zs")
    assert cli.main(["train", "--method", "zeroshot", "--data", data, "--shots", "1", "--output", out,
                     "--no-progress"]) == 0
    records = read_metrics(out)
    assert records[0]["options"]["template"] == "a centered satellite photo of {}."
    assert [r["kind"] for r in records] == ["run", "eval"]  # nothing trained: one evaluation
    top1 = records[-1]["top1_test"]
    capsys.readouterr()
    assert cli.main(["eval", out]) == 0
    assert json.loads(capsys.readouterr().out) == {"test": top1}
    assert cli.main(["train", "--method", "zeroshot", "--data", data, "--shots", "1", "--output", out,
                     "--no-progress"]) == 0  # a resume finds the finished run
    assert f"test {top1:.2f}%" in capsys.readouterr().out

    protocol = str(tmp_path / "b2n")
    assert cli.main(["run", "base2new", "--method", "zeroshot", "--seeds", "1", "--output", protocol,
                     "--no-progress"]) == 0
    assert "| zeroshot |" in capsys.readouterr().out

