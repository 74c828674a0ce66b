"""The training loop of `fastprompt train`: few-shot prompt learning with the field's recipe, JSONL metrics,
checkpoints that resume the exact trajectory, torchrun / DDP, and a deterministic mode.

Reproducibility is by construction: the data order of epoch e is a permutation drawn from (seed, e) (the
same as torch's DistributedSampler, so one process with batch G·b sees, step by step, the union of what G
ranks with batch b see), the random augmentation of a training image is drawn from (seed, epoch, index) (so
neither the number of DataLoader workers nor of ranks changes it), the learning rate is a function of the
epoch, and a checkpoint at the end of every epoch (and at a max_steps stop, with the number of batches of
the epoch already trained) holds the trained tensors, the optimizer, the gradient scaler, every RNG state
and the training seconds so far. A run stopped at any point resumes from its last checkpoint and replays the
interrupted epoch from its start (or from the batch where max_steps stopped it): the same parameters as a
run never stopped, and a wall clock that continues.

Ctrl-C (SIGINT) stops a run cleanly: the step in progress finishes, a checkpoint is saved at that step (also in
the middle of an epoch; in an evaluation, at the end of the epoch's training, so that the resume evaluates it)
and fit() raises TrainingInterrupted, which `fastprompt train` turns into one line naming the checkpoint and the
command that resumes it (exit status 130). A second Ctrl-C stops at once, without saving (unless it lands
while a batch loads, where no step is half done: the run is then saved as for the first). A loss that is not
finite stops the run with TrainingDiverged naming the step; nothing of that step is saved.

What that leaves to chance is the order of floating-point reductions in kernels that choose it at run time
(cuBLAS workspaces, cuDNN autotuning, atomics). Deterministic mode (`deterministic=True`) removes it for the
run's training and evaluation and restores the process's settings afterwards (`deterministic_mode`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .. import backends, methods
from ..clip import create_clip
from ..data import DataError, build_task
from ..methods.distributed import local_only
from ..methods.templates import template_for
from .config import ConfigError, TrainConfig, config_differences, fresh_output
from .device import resolve_device
from .metrics import MetricsLog, read_metrics


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at `step`, saved in `checkpoint`. `position` says where in the run that is, for
    people."""

    def __init__(self, step: int, position: str, checkpoint: str):
        super().__init__(f"interrupted at step {step} ({position})")
        self.step, self.position, self.checkpoint = step, position, checkpoint


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and what was kept."""


class _EvaluationStopped(Exception):
    """Ctrl-C during an evaluation inside fit(): the evaluation is abandoned, the run saved before it."""


def method_config(config: TrainConfig) -> dict:
    """The method's options of a run: as given, else the configuration that fits the small built-in CLIPs; a
    method that reads its dataset's hand-written template gets it unless `template` is given
    (methods/templates.py)."""
    from ..clip import SMALL_CONFIGS

    if config.method_config is not None:
        out = dict(config.method_config)
    else:
        out = dict(methods.SMALL_MODEL_CONFIGS.get(config.method, {})) if config.model in SMALL_CONFIGS else {}
    if getattr(methods.method_class(config.method), "template_from_dataset", False) and "template" not in out:
        out["template"] = template_for(config.data, config.split_file)
    return out


def resolve_optimizer(config: TrainConfig) -> str:
    """The optimizer a run uses (one of validate.OPTIMIZERS, checked there): as asked, or for "auto" the
    field's SGD, and AdamW on the built-in data with random CLIP weights (TrainConfig says why)."""
    if config.optimizer != "auto":
        return config.optimizer
    return "adamw" if config.data is None and not config.pretrained else "sgd"


class EpochPermutation(Sampler):
    """This rank's share of a permutation drawn from seed + epoch (DistributedSampler's recipe, padded to a
    multiple of the world size by repeating the head), less its first `skip` indices (the part of an epoch a
    run stopped by max_steps has already trained)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world, self.epoch, self.skip = n, seed, rank, world, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / self.world) * self.world
        order += order[: total - self.n]
        return order[self.rank:total:self.world][self.skip:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return max(math.ceil(self.n / self.world) - self.skip, 0)


def learning_rate(base: float, epoch: int, config: TrainConfig, warmup_epochs: Optional[int] = None) -> float:
    """Warm-up epochs at a constant warmup_lr, then a cosine from `base`: over the remaining epochs ("cosine"),
    or Dassl's, a cosine of period 2·epochs restarted after the warm-up ("dassl_cosine"; TrainConfig).
    warmup_epochs: this parameter group's (default: config.warmup_epochs, an int)."""
    warmup = config.warmup_epochs if warmup_epochs is None else warmup_epochs
    if epoch < warmup:
        return config.warmup_lr
    span = config.epochs if config.schedule == "dassl_cosine" else max(config.epochs - warmup, 1)
    return 0.5 * base * (1 + math.cos(math.pi * (epoch - warmup) / span))


def group_warmups(config: TrainConfig, n_groups: int) -> list:
    """The warm-up epochs of each parameter group: config.warmup_epochs for all, or its list, one per group."""
    if isinstance(config.warmup_epochs, (list, tuple)):
        if len(config.warmup_epochs) != n_groups:
            raise ConfigError(f"warmup_epochs {list(config.warmup_epochs)} gives {len(config.warmup_epochs)} values, "
                              f"but {config.method} trains {n_groups} parameter group(s): give one value, or one "
                              "per group in the method's order")
        return [int(w) for w in config.warmup_epochs]
    return [int(config.warmup_epochs)] * n_groups


class _Loss(nn.Module):
    """The method's training loss as a forward, so that DistributedDataParallel sees the step."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, images, labels):
        return self.method.loss_and_logits(images, labels)


CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True):
    """Deterministic algorithms for the duration of the block, the process's own settings restored on the way
    out (a run must not leave `torch.use_deterministic_algorithms` on for whatever the caller does next).

    Inside: torch.use_deterministic_algorithms(True) (ops without a deterministic kernel raise instead of
    running; on the CPU, uninitialised memory is filled with NaN so a read of it shows), cuDNN deterministic
    and not benchmarking, and CUBLAS_WORKSPACE_CONFIG set for deterministic cuBLAS (read when cuBLAS first
    allocates its workspace, so it takes effect in a process whose first matrix product runs inside). With
    enabled=False nothing is touched."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4] or CUBLAS_DETERMINISTIC_WORKSPACE
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """fit() trains `config.epochs` epochs (from the last checkpoint when one exists) and returns the last
    evaluation; evaluate() measures top-1 on the run's evaluation sets."""

    def __init__(self, config: TrainConfig, *, stop_after: Optional[int] = None,
                 announce: Optional[Callable[[str], None]] = None):
        self.config = config.validate()  # before anything is built, read or written
        if stop_after is not None and not (isinstance(stop_after, int) and stop_after >= 1):
            raise ConfigError(f"--stop-after takes a number of epochs, at least 1, got {stop_after!r}")
        self.stop_after = stop_after  # epochs to run in this invocation (a job with a time limit)
        self.announce = announce or (lambda message: None)  # where a resume says where it starts (rank 0)
        self._stop_requested = False  # set by the first Ctrl-C of fit(): stop at the end of the step
        self._setup_distributed()
        self._seed_everything(config.seed)
        try:
            self.clip_model = create_clip(config.model, config.pretrained, quick_gelu=config.quick_gelu,
                                          seed=config.seed)
        except (ValueError, RuntimeError) as exc:  # an unknown model name, weights that do not load
            what = repr(config.model) if config.model else f"from {config.pretrained}"
            raise ConfigError(f"cannot create the CLIP {what}: {exc}") from exc
        size = self.clip_model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        if config.image_size is not None and config.image_size != size:
            raise ConfigError(f"image_size {config.image_size} does not match the model's input size {size}: a ViT's "
                              "positional embedding fixes it (leave image_size out to use the model's)")
        self.task = build_task(self.clip_model, config.data, shots=config.shots, seed=config.seed,
                               subsample=config.subsample, split_file=config.split_file,
                               image_dir=config.image_dir, synthetic_classes=config.synthetic_classes,
                               augmentation=config.augmentation)
        if len(self.task.train) == 0:
            raise DataError(f"{config.data} holds no training images: an evaluation-only dataset (ImageNet-V2, "
                            "-Sketch, -A, -R) is a target of the transfer protocols (--targets), not a training set")
        self.method_config = method_config(config)
        try:
            self.method = methods.build(config.method, self.clip_model, self.task.classnames,
                                        **{**self.method_config, "backend": config.backend}).to(self.device)
        except ValueError as exc:  # the methods validate their options with ValueError (depth, n_ctx, ...)
            raise ConfigError(f"{config.method} with options {self.method_config}: {exc}") from exc
        self.precision = self._precision()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == torch.float16 else None
        groups = self.method.parameter_groups()
        for g in groups:
            g["base_lr"] = g.get("lr", config.lr)
            if not (isinstance(g["base_lr"], (int, float)) and math.isfinite(g["base_lr"]) and g["base_lr"] > 0):
                raise ConfigError(f"{config.method} trains a parameter group at learning rate {g['base_lr']!r}: "
                                  "learning rates are finite numbers above 0")
        for g, warmup in zip(groups, group_warmups(config, len(groups))):
            g["warmup_epochs"] = warmup
        self.optimizer_name = resolve_optimizer(config)
        if not groups:  # a baseline that trains nothing (zeroshot): a run is one evaluation
            self.optimizer = None
        elif self.optimizer_name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.step_model = _Loss(self.method)
        if self.world > 1 and self.optimizer is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.step_model = DistributedDataParallel(
                self.step_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True)
        self.sampler = EpochPermutation(len(self.task.train), config.seed, self.rank, self.world)
        if config.output is None:  # created last, once everything above has accepted the configuration
            self.config = config = dataclasses.replace(config, output=self._fresh_output())
        self.log = MetricsLog(os.path.join(config.output, "metrics.jsonl"), enabled=self.rank == 0)
        self.checkpoint_path = os.path.join(config.output, "checkpoint.pt")
        # the position: `epoch` the last epoch completed, `batches_done` batches of the next one trained (a
        # max_steps stop), `wall_s` training seconds so far (a resumed run's clock continues from it)
        self.epoch, self.step, self.batches_done, self.wall_s = 0, 0, 0, 0.0
        self.saved_step: Optional[int] = None  # the step of the last checkpoint written or read

    # ---- set-up ------------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        self.device = resolve_device(self.config.device)  # with its index: the local rank's under torchrun
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _fresh_output(self) -> str:
        """A new run folder (config.fresh_output), made by rank 0 and shared with the other ranks."""
        name = [fresh_output(self.config.method) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(name, src=0)
        return name[0]

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _precision(self) -> Optional[torch.dtype]:
        p = self.config.precision
        if p == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    def _autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def backend_label(self) -> str:
        """The backend the run's ops resolve to, for the step records: one name, or op: name pairs."""
        resolved = self.resolved_backend()
        names = set(resolved.values())
        return names.pop() if len(names) == 1 else ", ".join(f"{op}: {b}" for op, b in resolved.items())

    def batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.task.train) / self.world) / self.config.batch_size)

    def _step_limit_reached(self) -> bool:
        return bool(self.config.max_steps) and self.step >= self.config.max_steps

    def resolved_backend(self) -> dict:
        """Which backend each op runs on for this run's device (what the requested backend resolves to)."""
        problem = dict(dtype=torch.float32, m=1, dv=1, dt=1, d=1)
        out = {}
        for op in backends.OPS:
            try:
                out[op] = backends.select(op, self.config.backend, self.device, problem).backend
            except backends.BackendUnavailableError as exc:
                out[op] = f"unavailable: {exc}"
        return out

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self.saved_step = self.step
        if self.rank != 0:
            return
        state = {"method": self.method.state_dict(),
                 "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                 "scaler": self.scaler.state_dict() if self.scaler else None, "epoch": self.epoch,
                 "batches_done": self.batches_done, "step": self.step, "wall_s": self.wall_s,
                 "rng": _rng_state(self.device), "config": self.config.to_json(),
                 "schedule": {"kind": f"warmup-{self.config.schedule}", "epochs": self.config.epochs}}
        os.makedirs(self.config.output, exist_ok=True)
        tmp = self.checkpoint_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)  # atomic: an interruption never leaves half a checkpoint

    def load_checkpoint(self) -> bool:
        if not (self.config.resume and os.path.exists(self.checkpoint_path)):
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(json.loads(state["config"]))
        differences = config_differences(saved, self.config)
        if differences:
            raise ConfigError(f"{self.config.output} holds a run with other settings ({'; '.join(differences)}): "
                              "to resume it pass its settings; for a new run leave out --output or name a new "
                              "folder; to start it over pass --no-resume")
        self.method.load_state_dict(state["method"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.batches_done, self.wall_s = state.get("batches_done", 0), state.get("wall_s", 0.0)
        self.saved_step = self.step
        _set_rng_state(state["rng"], self.device)
        self.log.truncate_after(self.step)
        return True

    # ---- evaluation --------------------------------------------------------------------------------
    def _method_for(self, classnames: list):
        """The trained method for other class names (new classes): rebuilt on the same CLIP with the trained
        tensors whose shapes do not depend on the classes."""
        if classnames == self.task.classnames:
            return self.method
        other = methods.build(self.config.method, self.method.clip, classnames,
                              **{**self.method_config, "backend": self.config.backend}).to(self.device)
        own = other.state_dict()
        trained = {k: v for k, v in self.method.state_dict().items() if k in own and v.shape == own[k].shape}
        other.load_state_dict({**own, **trained})
        return other

    @torch.no_grad()
    def evaluate_on(self, dataset, classnames: list) -> float:
        """Top-1 (%) on a dataset whose labels index `classnames`, on this process alone (batch-mixing methods
        see the evaluation batch, whose size is logged). Leaves every RNG as it was, so evaluating never
        changes the training trajectory."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), local_only(), \
                deterministic_mode(self.config.deterministic):
            method = self._method_for(classnames)
            method.eval()
            correct = total = 0
            loader = DataLoader(dataset, batch_size=self.config.eval_batch_size, shuffle=False,
                                num_workers=self.config.num_workers)
            for images, labels in loader:
                if self._stop_requested and self.world == 1:  # under DDP the others wait: finish it
                    raise _EvaluationStopped
                images, labels = images.to(self.device), labels.to(self.device)
                with self._autocast():
                    logits = method(images)
                correct += (logits.argmax(-1) == labels).sum().item()
                total += labels.numel()
            method.train()
        return 100.0 * correct / max(total, 1)

    def evaluate(self) -> dict:
        """Top-1 on each evaluation set of the run, and the harmonic mean of base and new when both exist."""
        results = {name: self.evaluate_on(dataset, classnames)
                   for name, (dataset, classnames) in self.task.evaluations.items()}
        if "base" in results and "new" in results:
            b, n = results["base"], results["new"]
            results["hm"] = 2 * b * n / (b + n) if b + n > 0 else 0.0
        return results

    # ---- training ----------------------------------------------------------------------------------
    def _loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip_batches * self.config.batch_size
        self.task.train.set_epoch(epoch)  # augmentation drawn from (seed, epoch, index)
        return DataLoader(self.task.train, batch_size=self.config.batch_size, sampler=self.sampler,
                          num_workers=self.config.num_workers,
                          generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))

    def _mean_over_ranks(self, *values: float) -> list:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def fit(self) -> dict:
        """Train to the end of the run (or `stop_after` epochs, or `max_steps`); the last evaluation. Ctrl-C
        raises TrainingInterrupted once the step in progress is saved (module docstring)."""
        with deterministic_mode(self.config.deterministic), self._stop_on_sigint():
            return self._fit()

    @contextlib.contextmanager
    def _stop_on_sigint(self):
        """During fit(), the first SIGINT asks the loop to stop at the end of the step in progress; a second
        one raises KeyboardInterrupt where it lands (while a batch loads, _next_batch takes it as the first).
        The process's own handler is restored afterwards. Signal handlers belong to the main thread: elsewhere
        nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def position(self, epoch: int, batches: int) -> str:
        """Where a run is, for people: 'epoch 2/50, 3 of 8 batches done', or 'epoch 2/50 trained' (its
        evaluation and checkpoint then come first on resume); epoch 0-based in, 1-based out."""
        total = self.batches_per_epoch()
        if batches >= total:
            return f"epoch {epoch + 1}/{self.config.epochs} trained"
        return f"epoch {epoch + 1}/{self.config.epochs}, {batches} of {total} batches done"

    def _interrupted(self, epoch: int, batches: int) -> TrainingInterrupted:
        """Save the run at the step reached (`batches` of `epoch` trained) and say so."""
        self.epoch, self.batches_done = epoch - 1, batches
        self.save_checkpoint()
        return TrainingInterrupted(self.step, self.position(epoch, batches), self.checkpoint_path)

    def _next_batch(self, batches_iter):
        """The next batch, or None at the end of the epoch or when a stop was asked for while it loaded (a
        Ctrl-C that reached the DataLoader's workers too ends them: their absence is then no error)."""
        try:
            return next(batches_iter)
        except StopIteration:
            return None
        except KeyboardInterrupt:  # raised while loading: no step is half done, the run can be saved
            self._stop_requested = True
            return None
        except RuntimeError:
            if self._stop_requested:
                return None
            raise

    def _fit(self) -> dict:
        config = self.config
        self._stop_requested = False
        self.resumed = resumed = self.load_checkpoint()
        self.steps_run = 0
        start_epoch = self.epoch + 1 if resumed else 0
        if not resumed:
            self.log.reset()
            described = self.method.describe()
            self.log.write(kind="run", config=json.loads(config.to_json()),
                           data=self.task.description, world_size=self.world, device=str(self.device),
                           precision=str(self.precision or torch.float32), optimizer=self.optimizer_name,
                           backend=self.resolved_backend(), method=described, text_path=described["text_path"],
                           options=self.method_config, weights=getattr(self.clip_model, "fastprompt_weights", None),
                           torch=torch.__version__)
        elif start_epoch < config.epochs and not self._step_limit_reached():
            self.announce(f"resuming {config.output} from step {self.step} "
                          f"({self.position(start_epoch, self.batches_done)})")
        last_eval: dict = {}
        ran = 0
        skip = self.batches_done if resumed else 0  # batches of start_epoch trained before a stop
        started = time.perf_counter() - (self.wall_s if resumed else 0.0)
        backend = self.backend_label()
        if self.optimizer is None:  # nothing to train: the run is its evaluation
            return self._evaluate_untrained(resumed, started)
        self.method.train()
        for epoch in range(start_epoch, config.epochs):
            if (self.stop_after is not None and ran >= self.stop_after) or self._step_limit_reached():
                break
            for g in self.optimizer.param_groups:
                g["lr"] = learning_rate(g["base_lr"], epoch, config, g["warmup_epochs"])
            self.method.set_epoch(epoch, config.epochs)
            batches = skip if epoch == start_epoch else 0
            loader = self._loader(epoch, skip_batches=batches)
            progress = _progress(loader, f"epoch {epoch + 1}/{config.epochs}", config.progress and self.rank == 0)
            batches_iter = iter(progress)
            while not self._step_limit_reached():
                batch = self._next_batch(batches_iter)
                if batch is None:
                    break
                images, labels = batch
                t0 = time.perf_counter()
                images, labels = images.to(self.device), labels.to(self.device)
                with self._autocast():
                    loss, logits = self.step_model(images, labels)
                if self.scaler:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                # one device-to-host copy per step, and under DDP one collective: the means, and whether any
                # rank was asked to stop
                loss_v, accuracy = torch.stack([loss.detach().float(),
                                                (logits.argmax(-1) == labels).float().mean() * 100]).tolist()
                loss_v, acc_v, stop = self._mean_over_ranks(loss_v, accuracy, float(self._stop_requested))
                if not math.isfinite(loss_v):
                    raise TrainingDiverged(
                        f"the training loss is {loss_v} at step {self.step + 1} ({self.position(epoch, batches)}): "
                        "the run diverged and stopped, nothing of that step saved ("
                        + (f"{self.checkpoint_path} holds step {self.saved_step}" if self.saved_step is not None
                           else "no checkpoint was saved yet") + "); lower --lr, or try --precision fp32")
                self.step += 1
                self.steps_run += 1
                batches += 1
                seconds = time.perf_counter() - t0
                self.log.write(kind="step", step=self.step, epoch=epoch + 1, loss=loss_v, accuracy=acc_v,
                               lr=self.optimizer.param_groups[0]["lr"], images_per_s=labels.numel() * self.world /
                               max(seconds, 1e-9), wall_s=time.perf_counter() - started, backend=backend)
                progress.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.0f}%")
                if stop:
                    self._stop_requested = True
                    break
            progress.close()
            self.wall_s = time.perf_counter() - started
            if self._stop_requested:
                raise self._interrupted(epoch, batches)
            complete = batches >= self.batches_per_epoch()
            # a stop inside the epoch is saved as such, so that a resume trains the rest of it
            self.epoch, self.batches_done = (epoch, 0) if complete else (epoch - 1, batches)
            ran += complete
            final = (epoch == config.epochs - 1 and complete) or self._step_limit_reached()
            if (complete and config.eval_every and (epoch + 1) % config.eval_every == 0) or final:
                try:
                    last_eval = self._evaluate_and_log(epoch, time.perf_counter() - started)
                except _EvaluationStopped:  # the epoch is trained: the resume evaluates it first
                    raise self._interrupted(epoch, batches) from None
            self.wall_s = time.perf_counter() - started
            self.save_checkpoint()
            if self._step_limit_reached():
                break
        return last_eval if self.steps_run or not resumed else self.logged_evaluation()

    def _evaluate_untrained(self, resumed: bool, started: float) -> dict:
        """A method with nothing to train (zeroshot): evaluate once, checkpoint the run as finished (so that
        `fastprompt eval` and a resume find it), and return the evaluation."""
        if resumed:
            return self.logged_evaluation()
        self.epoch = self.config.epochs - 1
        results = self._evaluate_and_log(self.epoch, time.perf_counter() - started)
        self.wall_s = time.perf_counter() - started
        self.save_checkpoint()
        return results

    def logged_evaluation(self) -> dict:
        """The last evaluation in the run's metrics (what fit() returned when it ran), {} when there is none."""
        if not (self.log.enabled and os.path.exists(self.log.path)):
            return {}
        evals = [r for r in read_metrics(self.log.path) if r.get("kind") == "eval"]
        if not evals:
            return {}
        return {k[len("top1_"):] if k.startswith("top1_") else k: v for k, v in evals[-1].items()
                if k.startswith("top1_") or k == "hm"}

    def _evaluate_and_log(self, epoch: int, wall: float) -> dict:
        results = {}
        if self.rank == 0:
            results = self.evaluate()
            self.log.write(kind="eval", step=self.step, epoch=epoch + 1, eval_batch_size=self.config.eval_batch_size,
                           wall_s=wall, **{f"top1_{k}" if k != "hm" else "hm": v for k, v in results.items()})
        if self.world > 1:
            dist.barrier()
        return results


def _progress(iterable, description: str, enabled: bool):
    """A progress bar over the epoch's batches; disabled, the same object passes the batches through."""
    from tqdm import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, disable=not enabled)


def train(config: TrainConfig, stop_after: Optional[int] = None) -> dict:
    """Train a run; returns its last evaluation (top-1 per evaluation set)."""
    return Trainer(config, stop_after=stop_after).fit()

