"""The training harness: runs, protocols of the field, plots and step benchmarks."""

from .config import TrainConfig
from .metrics import MetricsLog, read_metrics
from .trainer import Trainer, train

__all__ = ["MetricsLog", "TrainConfig", "Trainer", "read_metrics", "train"]
