"""The gauges every run exports to Ray's metrics (the dashboard's Metrics view, Prometheus): loss, accuracy,
learning rate and images per second, labelled by run, study and trial.
"""

from __future__ import annotations

import math

# What every run exports through Ray's metrics API each epoch: Ray's metrics agent on the node serves them
# (as ray_raydist_<name>) where Prometheus scrapes, beside Ray's own CPU/GPU/memory metrics, and the
# dashboard's Metrics view shows them once Grafana and Prometheus are set up as Ray documents.
EXPORTED_METRICS = {
    "epoch": "epochs finished",
    "train_loss": "mean training loss of the last epoch",
    "train_acc": "training accuracy of the last epoch",
    "val_loss": "validation loss of the last epoch",
    "val_acc": "validation accuracy of the last epoch",
    "images_per_s": "training images per second over all workers, last epoch",
    "lr": "mean learning rate of the last epoch's updates",
}


METRIC_LABELS = ("run", "study", "trial")


class RunMetrics:
    """A run's per-epoch metrics as Ray gauges labelled with its run name (and study and trial for a Tune
    trial). One per process that reports (rank 0, or a one-worker trial's own process)."""

    def __init__(self, labels: dict):
        from ray.util.metrics import Gauge  # RAY

        self.tags = {key: str(labels.get(key) or "") for key in METRIC_LABELS}
        self.gauges = {name: Gauge(f"raydist_{name}", description=text, tag_keys=METRIC_LABELS)  # RAY
                       for name, text in EXPORTED_METRICS.items()}

    def record(self, metrics: dict) -> None:
        for name, gauge in self.gauges.items():
            value = metrics.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)
