"""The training harness: runs, protocols of the field, plots, comparisons and step benchmarks."""

from .config import ConfigError, TrainConfig
from .metrics import MetricsLog, read_metrics
from .trainer import Trainer, TrainingDiverged, TrainingInterrupted, train

__all__ = ["ConfigError", "MetricsLog", "TrainConfig", "Trainer", "TrainingDiverged", "TrainingInterrupted",
           "read_metrics", "train"]
