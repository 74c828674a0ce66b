"""The training harness: the default run, exact resume, DDP against one process, deterministic mode, data
on disk, K-shot sampling, base / new split, bad input, plots, protocols, the step benchmark."""

import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fastprompt import cli
from fastprompt.data import DataError, build_task, few_shot, read_dataset, subsample_classes
from fastprompt.data.records import Record
from fastprompt.train import TrainConfig, Trainer, read_metrics, train

SMALL = dict(method="coop", epochs=2, shots=4, batch_size=8, eval_batch_size=32, synthetic_classes=4,
             progress=False)


def _params(run: str) -> dict:
    return torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)["method"]


def _losses(run: str) -> list:
    return [r["loss"] for r in read_metrics(run) if r["kind"] == "step"]


def test_default_train_learns_the_builtin_shapes(tmp_path):
    """`fastprompt train` with its defaults: DCP on the built-in shapes with a frozen random CLIP must learn
    them, well away from chance (loss ln C, top-1 100/C %), on the training batches and on the test set."""
    out = str(tmp_path / "default")
    assert cli.main(["train", "--output", out, "--no-progress"]) == 0
    records = read_metrics(out)
    run = records[0]
    assert run["kind"] == "run" and run["config"]["method"] == "dcp" and run["config"]["data"] is None
    assert run["config"]["pretrained"] is None and run["optimizer"] == "adamw"
    classes = run["config"]["synthetic_classes"]
    chance_loss, chance_top1 = math.log(classes), 100.0 / classes
    steps = [r for r in records if r["kind"] == "step"]
    last_epoch = [r for r in steps if r["epoch"] == steps[-1]["epoch"]]
    final_loss = sum(r["loss"] for r in last_epoch) / len(last_epoch)
    final_accuracy = sum(r["accuracy"] for r in last_epoch) / len(last_epoch)
    assert final_loss < 0.7 * chance_loss, (final_loss, chance_loss)
    assert final_accuracy > 3 * chance_top1, final_accuracy
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert final_eval["top1_test"] > 3 * chance_top1, final_eval
    step = next(r for r in records if r["kind"] == "step")
    assert {"step", "epoch", "loss", "accuracy", "lr", "images_per_s", "wall_s", "backend"} <= set(step)
    assert {r["backend"] for r in steps} == {"reference"}  # what "auto" resolved to on the CPU
    assert any(r["kind"] == "eval" and "top1_test" in r for r in records)


def test_resume_continues_the_same_trajectory(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(TrainConfig(output=straight, **SMALL))
    train(TrainConfig(output=resumed, **SMALL), stop_after=1)
    assert torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=False)["epoch"] == 0
    saved_wall = torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=False)["wall_s"]
    train(TrainConfig(output=resumed, **SMALL))
    for key, value in _params(straight).items():
        assert torch.equal(_params(resumed)[key], value), key
    assert _losses(straight) == _losses(resumed)
    walls = [r["wall_s"] for r in read_metrics(resumed) if r["kind"] in ("step", "eval")]
    assert walls == sorted(walls) and walls[-1] > saved_wall > 0  # the clock continues across the resume


def test_a_max_steps_stop_inside_an_epoch_resumes_where_it_stopped(tmp_path):
    """SMALL has 2 steps per epoch: max_steps=3 stops in the middle of the second epoch; resuming without
    the limit trains the rest of that epoch, as the run never stopped would."""
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    train(TrainConfig(output=straight, **SMALL))
    train(TrainConfig(output=stopped, max_steps=3, **SMALL))
    state = torch.load(os.path.join(stopped, "checkpoint.pt"), weights_only=False)
    assert (state["epoch"], state["batches_done"], state["step"]) == (0, 1, 3)
    train(TrainConfig(output=stopped, max_steps=3, **SMALL))  # the limit still holds: nothing to do
    assert len(_losses(stopped)) == 3
    train(TrainConfig(output=stopped, **SMALL))
    for key, value in _params(straight).items():
        assert torch.equal(_params(stopped)[key], value), key
    assert _losses(stopped) == _losses(straight) and len(_losses(straight)) == 4
    assert [r["step"] for r in read_metrics(stopped) if r["kind"] == "step"] == [1, 2, 3, 4]


def test_an_interrupted_epoch_loses_nothing_that_was_checkpointed(tmp_path, monkeypatch):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    train(TrainConfig(output=straight, **SMALL))
    trainer = Trainer(TrainConfig(output=broken, **SMALL))
    calls = {"n": 0}
    original = type(trainer.task.train).__getitem__

    def failing(self, index):
        calls["n"] += 1
        if calls["n"] == len(trainer.task.train) + 5:  # in the middle of the second epoch
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(type(trainer.task.train), "__getitem__", failing)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(type(trainer.task.train), "__getitem__", original)
    train(TrainConfig(output=broken, **SMALL))
    for key, value in _params(straight).items():
        assert torch.equal(_params(broken)[key], value), key


def _determinism_flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def _record_flags(trainer, monkeypatch, fail=False):
    """Record the determinism flags at every training step and evaluation batch of `trainer`."""
    seen = {"step": [], "eval": []}
    step, forward = trainer.method.loss_and_logits, trainer.method.forward

    def recording_step(images, labels):
        seen["step"].append(_determinism_flags())
        if fail:
            raise RuntimeError("a step that fails")
        return step(images, labels)

    def recording_forward(images):
        seen["eval"].append(_determinism_flags())
        return forward(images)

    monkeypatch.setattr(trainer.method, "loss_and_logits", recording_step)
    monkeypatch.setattr(trainer.method, "forward", recording_forward)
    return seen


def test_deterministic_mode_holds_during_the_run_and_is_restored_after(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    before = _determinism_flags()
    assert before == (False, False, True, None)
    config = dict(**{**SMALL, "epochs": 1}, deterministic=True)
    trainer = Trainer(TrainConfig(output=str(tmp_path / "on"), **config))
    seen = _record_flags(trainer, monkeypatch)
    trainer.fit()
    inside = (True, True, False, ":4096:8")
    assert seen["step"] and set(seen["step"]) == {inside}
    assert seen["eval"] and set(seen["eval"]) == {inside}
    assert _determinism_flags() == before
    trainer.evaluate()  # evaluating a finished run is deterministic too, and restores as well
    assert set(seen["eval"]) == {inside} and _determinism_flags() == before

    failing = Trainer(TrainConfig(output=str(tmp_path / "failing"), **config))
    seen = _record_flags(failing, monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="a step that fails"):
        failing.fit()
    assert seen["step"] == [inside] and _determinism_flags() == before

    off = Trainer(TrainConfig(output=str(tmp_path / "off"), **{**config, "deterministic": False}))
    seen = _record_flags(off, monkeypatch)
    off.fit()
    assert set(seen["step"]) == {before}


def test_augmented_training_is_bit_identical_for_any_number_of_workers(tmp_path):
    """Random crops and flips on images on disk: a deterministic run with 2 DataLoader workers and one with none
    follow the same trajectory bit for bit (the augmentation is drawn from the run's seed, the epoch and the
    image, never from a worker's or the main process's generator, which differ between the two)."""
    for split in ("train", "test"):
        _write_images(str(tmp_path / "data" / split), ["cat", "dog"], 3, noise=True)
    config = dict(**{**SMALL, "shots": 3, "batch_size": 3}, data=str(tmp_path / "data"), deterministic=True)
    runs = {workers: str(tmp_path / f"workers{workers}") for workers in (2, 0)}
    for workers, run in runs.items():
        train(TrainConfig(output=run, num_workers=workers, **config))
    two, none = _params(runs[2]), _params(runs[0])
    assert all(torch.equal(none[k], v) for k, v in two.items())
    assert _losses(runs[0]) == _losses(runs[2]) and len(_losses(runs[0])) == 4
    # the augmentation is really random: another epoch crops the same image differently
    dataset = Trainer(TrainConfig(output=str(tmp_path / "x"), **config)).task.train
    first = dataset[0][0]
    assert torch.equal(dataset[0][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], first)


PROBE = """
import gc, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fastprompt import cli

end = cli._end_distributed

def probed():
    gc.collect()
    live = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"rank {dist.get_rank()}: {live} DDP wrappers alive when the group is destroyed", flush=True)
    end()

cli._end_distributed = probed
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ddp_run_releases_its_wrapper_before_destroying_the_group(tmp_path):
    """A DDP wrapper alive at destroy_process_group keeps the gloo group until interpreter shutdown, where it
    can abort the rank ('terminate called without an active exception', seen once in CI): `train` drops it
    first."""
    (tmp_path / "probe.py").write_text(PROBE)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(28500 + os.getpid() % 1000), str(tmp_path / "probe.py"), "train", "--method", "coop",
                           "--epochs", "1", "--shots", "4", "--no-progress", "--eval-every", "0", "--opt", "n_ctx=2",
                           "--batch-size", "4", "--output", str(tmp_path / "run")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted(line for line in done.stdout.splitlines() if "DDP wrappers alive" in line)
    assert reports == [f"rank {r}: 0 DDP wrappers alive when the group is destroyed" for r in (0, 1)], done.stdout


@pytest.mark.parametrize("method", ["dcp", "coop"], ids=["dcp-batch-pooled", "coop"])
def test_ddp_two_processes_equal_one_process_over_the_global_batch(tmp_path, method):
    """gloo on the CPU, torchrun: 2 ranks with batch 4 against 1 process with batch 8 (DCP's CMPA pools over
    the global batch through the gathered rows). SGD: the gradients are compared through updates linear in
    them (AdamW would blow the rounding noise of gradients that are zero in exact arithmetic, such as CMPA's
    key biases, up to full-size steps)."""
    common = ["--method", method, "--epochs", "2", "--shots", "4", "--no-progress", "--eval-every", "0",
              "--optimizer", "sgd", "--opt", "n_ctx=2"] + (["--opt", "depth=2"] if method == "dcp" else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    subprocess.run([sys.executable, "-m", "fastprompt", "train", *common, "--batch-size", "8", "--output", single],
                   check=True, env=env, capture_output=True, timeout=600)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), "-m", "fastprompt", "train", *common, "--batch-size", "4",
                           "--output", ddp], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _params(single), _params(ddp)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


# ---- data ----------------------------------------------------------------------------------------

def _write_images(root, classes, per_class, corrupt=None, noise=False, suffix=".png"):
    """Image files root/<class>/<i><suffix>: flat colours, or seeded noise (which a random crop changes)."""
    paths = []
    g = torch.Generator().manual_seed(len(root))
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, c, f"{i}{suffix}")
            if noise:
                pixels = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(path)
            else:
                Image.new("RGB", (12, 12), color=(10 * i, 40, 200)).save(path)
            paths.append(path)
    if corrupt:
        with open(os.path.join(root, classes[0], corrupt), "wb") as f:
            f.write(b"not an image")
    return paths


def test_split_json_is_read_with_its_image_folder(tmp_path):
    root = tmp_path / "pets"
    _write_images(str(root / "images"), ["abyssinian", "great_pyrenees"], 3)
    split = {"train": [["abyssinian/0.png", 0, "abyssinian"], ["great_pyrenees/1.png", 1, "great_pyrenees"]],
             "val": [["abyssinian/1.png", 0, "abyssinian"]],
             "test": [["abyssinian/2.png", 0, "abyssinian"], ["great_pyrenees/2.png", 1, "great_pyrenees"]]}
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    splits = read_dataset(str(root))
    assert splits.classnames == ["abyssinian", "great pyrenees"]
    assert [os.path.exists(r.path) for r in splits.train + splits.test] == [True] * 4
    assert len(splits.val) == 1


def test_image_folder_trees_are_read(tmp_path):
    _write_images(str(tmp_path / "flat"), ["cat", "dog"], 5)
    flat = read_dataset(str(tmp_path / "flat"), seed=3)
    assert flat.classnames == ["cat", "dog"] and len(flat.train) + len(flat.test) == 10
    for split in ("train", "test"):
        _write_images(str(tmp_path / "tree" / split), ["cat", "dog"], 2)
    tree = read_dataset(str(tmp_path / "tree"))
    assert len(tree.train) == 4 and len(tree.test) == 4 and tree.val == []


IMAGENET_CLASSES = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark")]


def _write_imagenet_family(root) -> dict:
    """CoOp's layouts of ImageNet and its variants, 3 classes: {name: folder}."""
    wnids = [w for w, _ in IMAGENET_CLASSES]
    folders = {name: os.path.join(root, name) for name in ("imagenet", "imagenet-sketch", "imagenet-r", "imagenetv2")}
    for folder in folders.values():
        os.makedirs(folder)
        with open(os.path.join(folder, "classnames.txt"), "w") as f:
            f.writelines(f"{w} {name}\n" for w, name in IMAGENET_CLASSES)
    _write_images(os.path.join(folders["imagenet"], "images", "train"), wnids, 3, suffix=".JPEG")
    _write_images(os.path.join(folders["imagenet"], "images", "val"), wnids, 2, suffix=".JPEG")
    _write_images(os.path.join(folders["imagenet-sketch"], "images"), wnids, 1, suffix=".JPEG")
    _write_images(os.path.join(folders["imagenet-r"], "imagenet-r"), wnids[1:], 2, suffix=".jpg")  # a subset
    with open(os.path.join(folders["imagenet-r"], "imagenet-r", "README.txt"), "w") as f:
        f.write("200 classes of ImageNet\n")
    _write_images(os.path.join(folders["imagenetv2"], "imagenetv2-matched-frequency-format-val"), ["0", "1", "2"], 1,
                  suffix=".jpeg")
    return folders


def test_imagenet_family_layouts_are_read_with_their_class_names(tmp_path):
    folders = _write_imagenet_family(str(tmp_path))
    names = [name for _, name in IMAGENET_CLASSES]

    imagenet = read_dataset(folders["imagenet"])
    assert imagenet.classnames == names and imagenet.val == []
    assert len(imagenet.train) == 9 and len(imagenet.test) == 6  # ImageNet's val folder is the test set
    for split, count in ((imagenet.train, 3), (imagenet.test, 2)):
        for label, (wnid, name) in enumerate(IMAGENET_CLASSES):
            mine = [r for r in split if f"/{wnid}/" in r.path]
            assert len(mine) == count and {(r.label, r.classname) for r in mine} == {(label, name)}
    assert "/images/val/" in imagenet.test[0].path

    sketch = read_dataset(folders["imagenet-sketch"])
    assert sketch.classnames == names and sketch.train == []
    assert sorted((r.label, r.classname) for r in sketch.test) == list(enumerate(names))

    subset = read_dataset(folders["imagenet-r"])  # -A / -R: the classes present, relabelled from 0
    assert subset.classnames == ["goldfish", "great white shark"] and len(subset.test) == 4
    assert {(r.label, r.classname, os.path.basename(os.path.dirname(r.path))) for r in subset.test} == {
        (0, "goldfish", "n01443537"), (1, "great white shark", "n01484850")}

    v2 = read_dataset(folders["imagenetv2"])  # folders are the labels
    assert v2.classnames == names
    assert sorted((r.label, r.classname, os.path.basename(os.path.dirname(r.path))) for r in v2.test) == [
        (i, name, str(i)) for i, name in enumerate(names)]

    task = build_task(Trainer(TrainConfig(**SMALL, output=str(tmp_path / "x"))).clip_model, folders["imagenet"],
                      shots=2)
    assert task.classnames == names and len(task.train) == 6 and len(task.evaluations["test"][0]) == 6


def test_imagenet_family_bad_layouts_get_clear_messages(tmp_path):
    folders = _write_imagenet_family(str(tmp_path))
    with pytest.raises(DataError, match="holds no training images: an evaluation-only dataset"):
        Trainer(TrainConfig(**SMALL, data=folders["imagenet-sketch"], output=str(tmp_path / "run")))
    os.remove(os.path.join(folders["imagenet-sketch"], "classnames.txt"))
    with pytest.raises(DataError, match="named by wnid but .* has no classnames.txt"):
        read_dataset(folders["imagenet-sketch"])
    with open(os.path.join(folders["imagenet-r"], "classnames.txt"), "a") as f:
        f.write("n01491361\n")
    with pytest.raises(DataError, match=r"classnames.txt:4: expected '<wnid> <class name>'"):
        read_dataset(folders["imagenet-r"])
    with open(os.path.join(folders["imagenet"], "classnames.txt"), "w") as f:
        f.write("n01440764 tench\n")
    with pytest.raises(DataError, match="class folders .*n01443537.* that .*classnames.txt does not list"):
        read_dataset(folders["imagenet"])


def test_k_shot_sampling_is_deterministic_and_never_exceeds_k():
    records = [Record(f"{c}/{i}", c, f"class {c}") for c in range(5) for i in range(3 + 2 * c)]
    first, again, other = few_shot(records, 3, seed=1), few_shot(records, 3, seed=1), few_shot(records, 3, seed=2)
    assert first == again and first != other
    for c in range(5):
        assert sum(r.label == c for r in first) == 3
    with pytest.raises(DataError, match="class 'class 0' has 3 training images, fewer than the 4 shots"):
        few_shot(records, 4, seed=1)


def test_base_new_split_is_the_fields():
    names = [f"c{i}" for i in range(7)]
    records = [Record(str(i), i, names[i]) for i in range(7)]
    base, base_names = subsample_classes(records, names, "base")
    new, new_names = subsample_classes(records, names, "new")
    assert base_names == names[:4] and new_names == names[4:]  # ⌈7/2⌉ = 4 base classes
    assert [r.label for r in new] == [0, 1, 2] and [r.classname for r in new] == names[4:]


def test_bad_input_gets_clear_messages(tmp_path):
    with pytest.raises(DataError, match="the data directory .*nowhere.* does not exist"):
        train(TrainConfig(data=str(tmp_path / "nowhere"), output=str(tmp_path / "a"), **SMALL))
    with pytest.raises(ValueError, match="unknown method 'dcpp'"):
        train(TrainConfig(**{**SMALL, "method": "dcpp"}, output=str(tmp_path / "b")))
    _write_images(str(tmp_path / "few"), ["cat", "dog"], 3)
    with pytest.raises(DataError, match="fewer than the 4 shots"):
        train(TrainConfig(**{**SMALL, "shots": 4}, data=str(tmp_path / "few"), output=str(tmp_path / "c")))
    _write_images(str(tmp_path / "bad" / "train"), ["cat", "dog"], 2, corrupt="broken.png")
    _write_images(str(tmp_path / "bad" / "test"), ["cat", "dog"], 1)
    with pytest.raises(DataError, match="cannot read image .*broken.png"):  # shots 0: every training image
        train(TrainConfig(**{**SMALL, "shots": 0}, data=str(tmp_path / "bad"), output=str(tmp_path / "d")))


def test_cli_reports_bad_input_in_one_line_and_keeps_tracebacks_for_bugs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default outputs go to ./runs
    _write_images(str(tmp_path / "few"), ["cat", "dog"], 3)
    _write_images(str(tmp_path / "bad" / "train"), ["cat", "dog"], 2, corrupt="broken.png")
    _write_images(str(tmp_path / "bad" / "test"), ["cat", "dog"], 1)
    tiny = ["--method", "coop", "--epochs", "1", "--no-progress"]
    cases = [
        (["train", "--data", "nowhere"], r"the data directory 'nowhere' does not exist"),
        (["train", "--method", "dcpp"], r"unknown method 'dcpp'; methods are coop, "),
        (["train", *tiny, "--opt", "nope=1"], r"coop has no option nope; its options are n_ctx="),
        (["train", *tiny, "--opt", "n_ctx"], r"--opt takes key=value, got 'n_ctx'"),
        (["train", *tiny, "--data", "few", "--shots", "4"], r"class 'cat' has 2 training images, fewer than the 4"),
        (["train", *tiny, "--data", "bad", "--shots", "0", "--workers", "2"],  # raised in a DataLoader worker
         r"^error: cannot read image \S*broken.png \(class 'cat'\): cannot identify image file"),
        (["eval", "norun"], r"norun holds no checkpoint.pt"),
        (["run", "fiveshot"], r"unknown protocol 'fiveshot'"),
        (["plot", "norun"], r"no metrics in norun"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, (argv, captured.err)
        assert re.search(message, captured.err) and "Traceback" not in captured.err, (argv, captured.err)
    # every input was checked before a run folder was made, the unreadable image included (found when the data
    # was opened, not during the epoch)
    assert not os.path.exists("runs")

    def bug(self):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(Trainer, "fit", bug)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        cli.main(["train", *tiny])


def test_default_output_is_a_fresh_run_and_only_an_explicit_output_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["train", "--method", "coop", "--opt", "n_ctx=2", "--epochs", "1", "--shots", "2", "--no-progress"]

    def folders():
        return sorted(name for name in os.listdir("runs") if name != "latest")

    assert cli.main(tiny) == 0
    first = folders()
    assert len(first) == 1 and first[0].startswith("coop-") and os.readlink("runs/latest") == first[0]
    assert cli.main(tiny) == 0  # the same command again: a new run, not a silent "resume" of the finished one
    second = [name for name in folders() if name not in first]
    assert len(second) == 1 and os.readlink("runs/latest") == second[0]
    assert "finished run" not in capsys.readouterr().out and len(_losses(os.path.join("runs", second[0]))) == 1
    assert cli.main([*tiny, "--method", "dcp", "--opt", "depth=1"]) == 0  # another method needs no new --output
    assert os.readlink("runs/latest").startswith("dcp-") and len(folders()) == 3

    latest = os.path.join("runs", second[0])
    before = read_metrics(latest)
    capsys.readouterr()
    assert cli.main([*tiny, "--output", latest]) == 0  # named: resumed, and it is finished
    assert "holds a finished run (or one at --max-steps): nothing to train" in capsys.readouterr().out
    assert read_metrics(latest) == before
    assert cli.main([*tiny, "--output", latest, "--lr", "0.5", "--shots", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (shots: 2 -> 1; lr: 0.02 -> 0.5)" in err and "--no-resume" in err


def test_training_on_an_image_folder(tmp_path):
    for split in ("train", "test"):
        _write_images(str(tmp_path / "data" / split), ["cat", "dog", "airplane"], 3)
    results = train(TrainConfig(**{**SMALL, "shots": 2, "epochs": 1}, data=str(tmp_path / "data"),
                                output=str(tmp_path / "run")))
    assert 0 <= results["test"] <= 100


def test_base_to_new_run_reports_base_new_and_harmonic_mean(tmp_path):
    results = train(TrainConfig(**{**SMALL, "epochs": 1, "subsample": "base"}, output=str(tmp_path / "b2n")))
    assert set(results) == {"base", "new", "hm"}
    task = build_task(Trainer(TrainConfig(**SMALL, output=str(tmp_path / "x"))).clip_model, subsample="base",
                      synthetic_classes=4)
    assert task.classnames == ["red circle", "green square"]


# ---- plots, protocols, benchmark -------------------------------------------------------------------

def test_plot_writes_a_png(tmp_path):
    runs = []
    for method in ("coop", "dcp"):
        run = str(tmp_path / method)
        train(TrainConfig(**{**SMALL, "method": method, "epochs": 1}, output=run))
        runs.append(run)
    out = str(tmp_path / "plot.png")
    assert cli.main(["plot", *runs, "--output", out]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 500


def test_a_protocol_runs_end_to_end_on_the_builtin_data(tmp_path, capsys):
    out = str(tmp_path / "protocol")
    assert cli.main(["run", "base2new", "--method", "coop", "--epochs", "1", "--shots", "2", "--seeds", "1", "2",
                     "--output", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| | base | new | hm |" in text and "±" in text
    assert os.path.exists(os.path.join(out, "summary.md"))


def _summary_table(text: str) -> tuple[list, dict]:
    """The markdown table of a protocol's summary: (columns, {row: [cells]})."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return columns, rows


def _final_top1(run: str) -> float:
    return [r for r in read_metrics(run) if r["kind"] == "eval"][-1]["top1_test"]


def test_fewshot_cross_dataset_and_domain_generalization_run_end_to_end(tmp_path, capsys):
    """Each recipe over two seeds with the tiniest settings: its summary table (printed and in summary.md) has
    the recipe's rows and columns, every cell mean ± std over the seeds, the source / K-shot cells those of
    the runs' own final evaluations. Domain generalisation: tiny ImageNet to its Sketch, -R and -V2 layouts."""
    folders = _write_imagenet_family(str(tmp_path / "data"))
    tiny = ["--method", "coop", "--opt", "n_ctx=2", "--epochs", "1", "--batch-size", "4", "--eval-every", "0",
            "--seeds", "1", "2", "--no-progress"]
    cases = {
        "fewshot": (["--shots-list", "1", "2"], ["top-1"], ["1 shots", "2 shots"]),
        "cross_dataset": (["--shots", "2"], ["source", "shapes, other seed"], ["coop"]),
        "domain_generalization": (["--data", folders["imagenet"], "--shots", "2", "--targets",
                                   folders["imagenet-sketch"], folders["imagenet-r"], folders["imagenetv2"]],
                                  ["source", "imagenet-sketch", "imagenet-r", "imagenetv2"], ["coop"]),
    }
    for protocol, (args, columns, rows) in cases.items():
        out = str(tmp_path / protocol)
        assert cli.main(["run", protocol, *tiny, *args, "--output", out]) == 0, protocol
        printed = capsys.readouterr().out
        with open(os.path.join(out, "summary.md")) as f:
            summary = f.read()
        assert summary.strip() in printed and summary.startswith(f"{protocol}: coop on ")
        got_columns, got_rows = _summary_table(summary)
        assert got_columns == columns and list(got_rows) == rows, (protocol, summary)
        for row, cells in got_rows.items():
            for column, cell in zip(columns, cells):
                mean, std = (float(x) for x in cell.split(" ± "))
                assert 0 <= mean <= 100 and std >= 0, (protocol, row, column, cell)
                if column in ("top-1", "source"):
                    runs = [os.path.join(out, f"{row.split()[0]}shot-seed{seed}" if protocol == "fewshot"
                                         else f"seed{seed}") for seed in (1, 2)]
                    values = [_final_top1(run) for run in runs]
                    assert cell == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}", (protocol, row)


def test_bench_reports_images_per_second_and_a_profile_and_nothing_on_stderr():
    """A fresh process (the profiler's C++ logger reads its level when it first starts): the table on stdout,
    and no profiler stages or device-count errors on stderr."""
    done = subprocess.run([sys.executable, "-m", "fastprompt", "bench", "--methods", "coop", "--steps", "1",
                           "--batch-size", "2", "--classes", "3"], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| coop | reference |" in done.stdout and "text tower %" in done.stdout
    assert done.stderr == ""


def test_eval_of_a_finished_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    train(TrainConfig(**{**SMALL, "epochs": 1}, output=run))
    assert cli.main(["eval", run]) == 0
    assert "test" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
