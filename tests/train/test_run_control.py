"""Controlling a run: the device `--device` resolves to (a GPU machine simulated: torch.cuda answers as it would
there), Ctrl-C during `fastprompt train` (a real SIGINT to a subprocess: exit status 130, one line, a checkpoint
at the step reached, a rerun that says where it resumes and finishes), a loss that stops being finite, and the
checks made when the data is opened and before a protocol's first run."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from fastprompt import cli
from fastprompt.data import DataError, task_records
from fastprompt.train import ConfigError, TrainConfig, Trainer, read_metrics
from fastprompt.train.device import resolve_device
from fastprompt.train.trainer import TrainingDiverged

SMALL = dict(method="coop", epochs=2, shots=4, batch_size=8, eval_batch_size=32, synthetic_classes=4,
             progress=False, method_config=dict(n_ctx=2))


# ---- --device -----------------------------------------------------------------------------------------

@pytest.fixture
def four_gpus(monkeypatch):
    """torch.cuda as on a machine with 4 devices, device 2 current (what CUDA_VISIBLE_DEVICES or an earlier
    torch.cuda.set_device leaves)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cuda_means_the_current_device_and_under_torchrun_the_local_ranks(four_gpus):
    # the crash of the issue: torch.cuda.set_device(torch.device("cuda")) needs an index
    for spec in ("cuda", "auto"):
        assert resolve_device(spec) == torch.device("cuda", 2), spec
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device cuda:4: this machine has 4 CUDA device\(s\), cuda:0 to cuda:3"):
        resolve_device("cuda:4")
    four_gpus.setenv("WORLD_SIZE", "4")
    four_gpus.setenv("LOCAL_RANK", "1")
    for spec in ("cuda", "auto"):
        assert resolve_device(spec) == torch.device("cuda", 1), spec
    with pytest.raises(ConfigError, match="under torchrun would put every rank on device 0: use --device cuda"):
        resolve_device("cuda:0")
    four_gpus.setenv("LOCAL_RANK", "5")
    with pytest.raises(ConfigError, match="LOCAL_RANK 5 has no CUDA device: this node has 4"):
        resolve_device("cuda")


def test_without_cuda_auto_is_the_cpu_and_cuda_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda: no CUDA device is available here"):
        resolve_device("cuda")


def test_the_trainer_sets_the_resolved_indexed_device(four_gpus):
    seen = []
    four_gpus.setattr(torch.cuda, "set_device", seen.append)
    trainer = Trainer.__new__(Trainer)
    trainer.config = TrainConfig(device="cuda")
    trainer._setup_distributed()
    assert trainer.device == torch.device("cuda", 2) and seen == [torch.device("cuda", 2)]


# ---- Ctrl-C ---------------------------------------------------------------------------------------------

def _steps(run: str) -> list:
    return [r["step"] for r in read_metrics(run) if r["kind"] == "step"] if os.path.exists(
        os.path.join(run, "metrics.jsonl")) else []


def test_ctrl_c_saves_the_step_reached_and_the_rerun_resumes_there(tmp_path, capsys):
    """SIGINT to `fastprompt train` once it has logged a few steps: status 130, one line naming the checkpoint
    and the command that resumes, a checkpoint at the last logged step (mid-epoch: 4 steps per epoch); the
    command it names resumes from that step and finishes the run with every step logged once."""
    run = str(tmp_path / "run")
    argv = ["train", "--method", "coop", "--opt", "n_ctx=2", "--epochs", "6", "--shots", "4", "--batch-size", "8",
            "--eval-every", "0", "--no-progress", "--output", run]
    child = subprocess.Popen([sys.executable, "-m", "fastprompt", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while len(_steps(run)) < 3 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 130, err[-3000:]
    assert err.count("\n") == 1 and "Traceback" not in err, err
    match = re.fullmatch(r"interrupted at step (\d+) \(epoch (\d)/6(?:, (\d) of 4 batches done| trained)\): "
                         r"saved (\S+); resume with: (fastprompt train .*)\n", err)
    assert match, err
    step, epoch, batches, checkpoint, command = int(match[1]), int(match[2]), int(match[3] or 4), match[4], match[5]
    assert checkpoint == os.path.join(run, "checkpoint.pt") and 3 <= step < 24
    assert (epoch - 1) * 4 + batches == step  # the position is that of the step
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["step"] == step == _steps(run)[-1]
    assert (state["epoch"], state["batches_done"]) == (epoch - 2, batches)  # the last epoch completed, 0-based

    resume = command.split()[1:]
    assert resume[resume.index("--output") + 1] == run and "--no-resume" not in resume
    assert cli.main(resume) == 0
    printed = capsys.readouterr().out
    assert f"resuming {run} from step {step} (epoch" in printed
    assert _steps(run) == list(range(1, 25))  # 6 epochs of 4 steps, each logged once


def test_ctrl_c_in_the_main_process_stops_at_the_end_of_the_step(tmp_path, monkeypatch):
    """The handler only asks for a stop: the step in progress completes (its optimizer step and record), the
    checkpoint holds it, and the process's own SIGINT handler is back afterwards."""
    trainer = Trainer(TrainConfig(output=str(tmp_path / "run"), **SMALL))
    step = trainer.method.loss_and_logits

    def interrupted_step(images, labels):
        if trainer.step == 2:  # during the third step
            signal.raise_signal(signal.SIGINT)
        return step(images, labels)

    monkeypatch.setattr(trainer.method, "loss_and_logits", interrupted_step)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as caught:
        trainer.fit()
    assert caught.value.step == 3 and caught.value.position == "epoch 2/2, 1 of 2 batches done"
    assert signal.getsignal(signal.SIGINT) is before
    state = torch.load(trainer.checkpoint_path, map_location="cpu", weights_only=False)
    assert (state["step"], state["epoch"], state["batches_done"]) == (3, 0, 1)


# ---- a loss that is not finite --------------------------------------------------------------------------

def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    trainer = Trainer(TrainConfig(output=run, **SMALL))
    step = trainer.method.loss_and_logits

    def diverging(images, labels):
        loss, logits = step(images, labels)
        return (loss * float("nan") if trainer.step >= 2 else loss), logits

    monkeypatch.setattr(trainer.method, "loss_and_logits", diverging)
    with pytest.raises(TrainingDiverged, match=r"the training loss is nan at step 3 \(epoch 2/2, 0 of 2 batches "
                                               r"done\).* holds step 2\); lower --lr"):
        trainer.fit()
    assert _steps(run) == [1, 2]  # the step that diverged is not logged, the checkpoint is the epoch's end
    assert torch.load(trainer.checkpoint_path, map_location="cpu", weights_only=False)["step"] == 2

    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(TrainingDiverged("the loss is inf")))
    assert cli.main(["train", "--method", "coop", "--epochs", "1", "--no-progress", "--output", run + "2"]) == 1
    err = capsys.readouterr().err
    assert err == "error: the loss is inf\n"


# ---- data checked when opened, protocols before their first run -----------------------------------------

def _image_folder(root, per_class=3, broken=None):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (50 * i, 90, 200)).save(os.path.join(root, split, c, f"{i}.png"))
    if broken:
        with open(os.path.join(root, *broken), "wb") as f:
            f.write(b"\x89PNG truncated")


def test_an_unreadable_image_is_found_when_the_dataset_is_opened(tmp_path, monkeypatch):
    """A broken test image would otherwise surface at the first evaluation, after an epoch of training."""
    _image_folder(str(tmp_path / "data"), broken=("test", "dog", "1.png"))
    stepped = []
    monkeypatch.setattr(Trainer, "_fit", lambda self: stepped.append(1))
    with pytest.raises(DataError, match=r"cannot read image \S*test/dog/1.png \(class 'dog'\)"):
        Trainer(TrainConfig(**{**SMALL, "shots": 2}, data=str(tmp_path / "data"), output=str(tmp_path / "run")))
    assert not stepped and not os.path.exists(tmp_path / "run")


def test_a_protocol_checks_every_run_before_the_first_trains(tmp_path, monkeypatch):
    """fewshot over K = 1, 2, 8 on a dataset with 3 images per class: K = 8 cannot run, which is said before
    K = 1 trains; a transfer target with a broken image likewise."""
    from fastprompt.train import protocols

    _image_folder(str(tmp_path / "data"))
    _image_folder(str(tmp_path / "target"), broken=("test", "cat", "0.png"))
    trained = []
    monkeypatch.setattr(protocols, "_run", lambda *args, **kwargs: trained.append(kwargs))
    config = TrainConfig(**{**SMALL, "shots": 2}, data=str(tmp_path / "data"), output=str(tmp_path / "p"))
    with pytest.raises(DataError, match="fewer than the 8 shots"):
        protocols.run_protocol("fewshot", config, seeds=[1, 2], shots_list=[1, 2, 8])
    with pytest.raises(DataError, match=r"cannot read image \S*target/test/cat/0.png"):
        protocols.run_protocol("cross_dataset", config, seeds=[1], targets=[str(tmp_path / "target")])
    assert trained == []


def test_a_transfer_target_is_checked_for_what_it_is_read_for(tmp_path):
    """A target is only evaluated: a broken training image there is never read, so it does not stop the
    protocol, and the target's training images are not opened (a broken test image does stop it, above)."""
    from fastprompt.train import protocols

    _image_folder(str(tmp_path / "data"))
    _image_folder(str(tmp_path / "target"), broken=("train", "cat", "0.png"))
    config = TrainConfig(**{**SMALL, "shots": 2}, data=str(tmp_path / "data"), output=str(tmp_path / "p"))
    runs = protocols.plan("cross_dataset", config, [1], [str(tmp_path / "target")], None)
    protocols.check_runs(config, runs, [str(tmp_path / "target")])
    task = task_records(str(tmp_path / "target"), train=False)
    assert task.train == [] and len(task.evaluations["test"][0]) == 6
