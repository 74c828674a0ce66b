"""The training harness: runs, protocols of the field, plots and step benchmarks."""

from .config import ConfigError, TrainConfig
from .metrics import MetricsLog, read_metrics
from .trainer import Trainer, train

__all__ = ["ConfigError", "MetricsLog", "TrainConfig", "Trainer", "read_metrics", "train"]
