"""Metrics of a run as JSON lines: one record per step ({"kind": "step", ...}), per evaluation
({"kind": "eval", ...}) and one describing the run ({"kind": "run", ...}); `fastprompt plot` reads them."""

from __future__ import annotations

import json
import os


class MetricsLog:
    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def reset(self) -> None:
        if self.enabled:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            open(self.path, "w").close()

    def write(self, **record) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop what was logged after the checkpoint (the replayed steps are logged again)."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


def read_metrics(path: str) -> list:
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
