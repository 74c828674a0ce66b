"""The device of a run, from `--device`: always a torch.device with an index where the device has several
(torch.cuda.set_device refuses a bare "cuda"), checked against what this machine has before any work.

  auto     the CUDA device below when CUDA is available, else the CPU
  cuda     the current CUDA device (torch.cuda.current_device(), CUDA_VISIBLE_DEVICES applied); under torchrun
           the local rank's (LOCAL_RANK), so that N ranks on a node use its N devices
  cuda:N   device N, in a single process (under torchrun every rank would land on the same device)
  cpu      the CPU
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(spec: str) -> torch.device:
    """The torch.device a run trains on (module docstring); ConfigError when this machine has none such."""
    if spec == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device takes auto, cpu, cuda or cuda:N, got {spec!r}") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"--device {spec}: fastprompt trains on auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: no CUDA device is available here (torch {torch.__version__}, CUDA "
                          f"{torch.version.cuda or 'none: a CPU build of torch'}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if device.index is None:
        index = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        if index >= count:
            raise ConfigError(f"LOCAL_RANK {index} has no CUDA device: this node has {count}; start at most {count} "
                              "processes per node (torchrun --nproc_per_node)")
        return torch.device("cuda", index)
    if under_torchrun():
        raise ConfigError(f"--device {spec} under torchrun would put every rank on device {device.index}: use "
                          "--device cuda (each rank its local rank's device) or auto")
    if device.index >= count:
        raise ConfigError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
