"""Every bad command-line input ends in one line `error: ...` and exit status 2, before any work, and nothing
is silently changed: a table of the inputs a new user tries, flag by flag (types, ranges, paths,
combinations), each with the message it must give. The checks run before a CLIP is built, so the table is
fast; a few entries need the model (an option's range against its blocks) and build the tiny one."""

import json
import os
import re

import pytest
import torch
from PIL import Image

from fastprompt import cli

TINY = ["--method", "coop", "--epochs", "1", "--no-progress"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder with the inputs the table points at: a dataset with few images, one with a broken training
    image, one with a broken test image (what a transfer target is read for), a file where a folder is expected, a run that has trained, a metrics file without steps."""
    monkeypatch.chdir(tmp_path)
    for name, count in (("few", 3), ("bad", 2), ("badtest", 2)):
        for c in ("cat", "dog"):
            os.makedirs(f"{name}/train/{c}")
            os.makedirs(f"{name}/test/{c}")
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(f"{name}/train/{c}/{i}.png")
            Image.new("RGB", (8, 8)).save(f"{name}/test/{c}/0.png")
    with open("bad/train/cat/broken.png", "wb") as f:
        f.write(b"not an image")
    with open("badtest/test/dog/broken.png", "wb") as f:
        f.write(b"not an image")
    with open("a_file", "w") as f:
        f.write("x")
    os.makedirs("run")
    with open("run/metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "step", "step": 1, "epoch": 1, "loss": 1.0, "wall_s": 0.1}) + "\n")
    os.makedirs("empty_run")
    with open("empty_run/metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "run", "config": {"method": "coop"}}) + "\n")
    return tmp_path


CUDA = torch.cuda.is_available()

BAD_INPUTS = [
    # train: the method and its options
    (["train", "--method", "dcpp"], r"unknown method 'dcpp'; methods are coop, cocoop"),
    (["train", *TINY, "--opt", "n_ctx=abc"], r"coop option n_ctx takes an int, got 'abc'"),
    (["train", *TINY, "--opt", "n_ctx=2.5"], r"coop option n_ctx takes an int, got 2.5"),
    (["train", *TINY, "--opt", "pack_text=yes"], r"coop option pack_text takes True or False, got 'yes'"),
    (["train", *TINY, "--opt", "nope=1"], r"coop has no option nope; its options are n_ctx="),
    (["train", *TINY, "--opt", "n_ctx"], r"--opt takes key=value, got 'n_ctx'"),
    (["train", *TINY, "--opt", "n_ctx=0"], r"coop: n_ctx must be at least 1, got 0"),
    (["train", *TINY, "--method", "maple", "--opt", "depth=9"],
     r"maple: text depth 9 is out of range: this model's tower has 4 blocks.*SMALL_MODEL_CONFIGS\['maple'\]"),
    (["train", *TINY, "--method", "dpt", "--opt", "bottom_limit=4", "--opt", "lr=-1"],
     r"dpt trains a parameter group at learning rate -1"),
    # the model
    (["train", *TINY, "--model", "ViT-Q-99"], r"cannot create the CLIP 'ViT-Q-99'"),
    (["train", *TINY, "--pretrained", "openai"], r"fastprompt-tiny is a fastprompt test configuration"),
    # data
    (["train", *TINY, "--data", "nowhere"], r"the data directory 'nowhere' does not exist"),
    (["train", *TINY, "--data", "a_file"], r"the data directory 'a_file' is a file, not a dataset folder"),
    (["train", *TINY, "--split-file", "nope.json"], r"--split-file names a part of a dataset on disk: give the "
                                                     r"dataset with --data"),
    (["train", *TINY, "--image-dir", "few"], r"--image-dir names a part of a dataset on disk"),
    (["train", *TINY, "--data", "few", "--split-file", "nope.json"], r"the split file 'nope.json' does not exist"),
    (["train", *TINY, "--data", "few", "--split-file", "a_file"], r"a_file is not valid JSON"),
    (["train", *TINY, "--data", "few", "--image-dir", "nowhere"], r"the image folder 'nowhere' does not exist"),
    (["train", *TINY, "--data", "few", "--shots", "4"], r"class 'cat' has 3 training images, fewer than the 4 shots"),
    (["train", *TINY, "--data", "bad", "--shots", "0"], r"cannot read image \S*broken.png \(class 'cat'\): cannot "
                                                        r"identify image file"),
    (["train", *TINY, "--shots", "0"], r"--shots 0 \(every image\) applies to a dataset on disk"),
    (["train", *TINY, "--shots", "-1"], r"--shots takes a number of training images per class, at least 1"),
    (["train", *TINY, "--shots", "x"], r"argument --shots: invalid int value: 'x'"),
    (["train", *TINY, "--subsample", "half"], r"argument --subsample: invalid choice: 'half'"),
    # the recipe
    (["train", *TINY, "--epochs", "0"], r"--epochs takes a number of epochs, at least 1, got 0"),
    (["train", *TINY, "--batch-size", "0"], r"--batch-size takes a batch size, at least 1, got 0"),
    (["train", *TINY, "--eval-batch-size", "-2"], r"--eval-batch-size takes a batch size, at least 1, got -2"),
    (["train", *TINY, "--lr", "-1"], r"--lr takes a learning rate, a finite number above 0, got -1.0"),
    (["train", *TINY, "--lr", "0"], r"--lr takes a learning rate, a finite number above 0, got 0.0"),
    (["train", *TINY, "--lr", "nan"], r"--lr takes a learning rate, a finite number above 0, got nan"),
    (["train", *TINY, "--lr", "inf"], r"--lr takes a learning rate, a finite number above 0, got inf"),
    (["train", *TINY, "--lr", "fast"], r"argument --lr: invalid float value: 'fast'"),
    (["train", *TINY, "--optimizer", "rmsprop"], r"argument --optimizer: invalid choice: 'rmsprop'"),
    (["train", *TINY, "--max-steps", "0"], r"--max-steps takes a number of steps, at least 1, got 0"),
    (["train", *TINY, "--stop-after", "0"], r"--stop-after takes a number of epochs, at least 1, got 0"),
    (["train", *TINY, "--eval-every", "-1"], r"--eval-every takes a number of epochs between evaluations"),
    # where and how it runs
    (["train", *TINY, "--backend", "tpu"], r"argument --backend: invalid choice: 'tpu'"),
    (["train", *TINY, "--precision", "fp8"], r"argument --precision: invalid choice: 'fp8'"),
    (["train", *TINY, "--device", "tpu"], r"--device takes auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["train", *TINY, "--device", "mps"], r"--device mps: fastprompt trains on auto, cpu, cuda or cuda:N"),
    (["train", *TINY, "--device", "cuda:99"], r"--device cuda:99: (this machine has|no CUDA device)"),
    (["train", *TINY, "--seed", "-1"], r"--seed takes a seed from 0 to 4294967295, got -1"),
    (["train", *TINY, "--seed", str(2**32)], r"--seed takes a seed from 0 to 4294967295, got 4294967296"),
    (["train", *TINY, "--workers", "-1"], r"--workers takes a number of DataLoader workers, at least 0, got -1"),
    (["train", *TINY, "--output", "a_file"], r"--output 'a_file' is a file, not a run folder"),
    (["train", *TINY, "--epochs", "0", "--lr", "-1"], r"--epochs takes .*; --lr takes"),  # all problems, one line
    (["train", "--nope"], r"unrecognized arguments: --nope"),
    # protocols
    (["run", "fiveshot"], r"unknown protocol 'fiveshot'; protocols are base2new"),
    (["run", "fewshot", *TINY, "--shots", "4"], r"fewshot sets these itself, leave them out: --shots"),
    (["run", "base2new", *TINY, "--subsample", "new"], r"base2new sets these itself.*--subsample"),
    (["run", "base2new", *TINY, "--seed", "3"], r"--seed: the protocol runs --seeds"),
    (["run", "base2new", *TINY, "--targets", "few"], r"--targets applies to cross_dataset and "
                                                     r"domain_generalization, not base2new"),
    (["run", "base2new", *TINY, "--shots-list", "1", "2"], r"--shots-list applies to fewshot, not base2new"),
    (["run", "fewshot", *TINY, "--shots-list", "0", "1"], r"--shots-list takes whole numbers of at least 1"),
    (["run", "fewshot", *TINY, "--shots-list", "2", "2"], r"--shots-list lists \[2\] twice"),
    (["run", "base2new", *TINY, "--seeds", "1", "1"], r"--seeds lists \[1\] twice"),
    (["run", "base2new", *TINY, "--seeds", "-1"], r"--seeds takes whole numbers of at least 0"),
    (["run", "fewshot", *TINY, "--data", "few", "--shots-list", "1", "4"], r"fewer than the 4 shots"),
    (["run", "cross_dataset", *TINY, "--targets", "nowhere"], r"the target dataset 'nowhere' does not exist"),
    (["run", "cross_dataset", *TINY, "--targets", "badtest"], r"cannot read image \S*badtest/test/dog/broken.png"),
    (["run", "base2new", *TINY, "--epochs", "0"], r"--epochs takes a number of epochs, at least 1"),
    # eval, plot, compare
    (["eval", "norun"], r"norun holds no checkpoint.pt: eval takes the output folder of a run"),
    (["plot", "norun"], r"no metrics in norun"),
    (["plot", "empty_run"], r"empty_run holds no step records"),
    (["plot", "run", "--output", "plot.jpg"], r"plot --output 'plot.jpg': the format follows the suffix, one of "
                                              r"\.png, \.svg, \.pdf"),
    (["plot", "run", "--smooth", "0"], r"plot --smooth takes a number of steps, at least 1"),
    (["plot", "run", "--metric", "accuracy"], r"argument --metric: invalid choice: 'accuracy'"),
    (["compare", "norun"], r"no metrics in norun"),
    (["compare", "run", "--target", "0"], r"compare --target takes a top-1 in % above 0 and at most 100, got 0.0"),
    (["compare", "run", "--target", "150"], r"compare --target takes a top-1 in %.*got 150.0"),
    (["compare", "run", "--target", "nan"], r"compare --target takes a top-1 in %.*got nan"),
    (["compare", "run", "--split", "val"], r"argument --split: invalid choice: 'val'"),
    # bench, demo, info
    (["bench", "--methods", "coopp"], r"bench --methods: unknown method 'coopp'; methods are coop"),
    (["bench", "--backends", "tpu"], r"bench --backends: unknown backend 'tpu'; backends are reference"),
    (["bench", "--batch-size", "0"], r"bench --batch-size takes a batch size, at least 1, got 0"),
    (["bench", "--classes", "1"], r"bench --classes takes a number of classes, at least 2, got 1"),
    (["bench", "--steps", "0"], r"bench --steps takes a number of timed steps, at least 1, got 0"),
    (["bench", "--methods", "coop", "--model", "ViT-Q-99"], r"bench --model 'ViT-Q-99'"),
    (["demo", "--rounds", "0"], r"demo --rounds takes a number of timed repetitions, at least 1, got 0"),
    (["demo", "--device", "tpu"], r"demo --device takes auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["demo", "--backends", "fast"], r"demo --backends: unknown backend 'fast'"),
    (["info", "--verbose"], r"unrecognized arguments: --verbose"),
]
if not CUDA:
    BAD_INPUTS += [
        (["train", *TINY, "--device", "cuda"], r"--device cuda: no CUDA device is available here"),
        (["demo", "--device", "cuda:1"], r"demo --device cuda:1: no CUDA device is available here"),
    ]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_with_status_2_before_any_work(workspace, capsys, argv, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(message, captured.err), captured.err
    assert "Traceback" not in captured.err and captured.out == "", captured
    assert not os.path.exists("runs")  # no run folder was made, nothing trained


def test_the_python_api_gets_the_same_checks(tmp_path):
    from fastprompt.train import ConfigError, TrainConfig, train

    with pytest.raises(ConfigError, match=r"--batch-size takes a batch size, at least 1, got 0; --lr takes a "
                                          r"learning rate, a finite number above 0, got -1"):
        train(TrainConfig(batch_size=0, lr=-1, output=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match=r"--epochs takes a number of epochs, at least 1, got 2.5"):
        TrainConfig(epochs=2.5).validate()
    assert not os.path.exists(tmp_path / "run")
    assert TrainConfig().validate() == TrainConfig()
