"""Test-set accuracy, measured once at the end: a run's final model and best checkpoint, or a study's best model.

    measured = measure_run(cfg, summary)        # after raydist.ray_edge.fit.fit; None for digits and fake data
    print(summary_line(measured))               # test acc: final model 71.2%, best checkpoint (epoch 7) 72.0% on ...

Validation ("val", held out of the training set) is what every epoch reports, what checkpoints are kept by and
what a study selects on, so the best of it is an optimistic estimate. The published test set is kept for this
one measurement after all choices are made. It runs as one Ray task on the cluster, because the data lives on
the worker nodes (on a GPU when the run trained on GPUs), through the engine's own evaluation
(raydist.loop.evaluate.evaluate_model: the validation's normalisation, channels and resize). The figures go to the
run (or study) folder as test_metrics.json.
"""

from __future__ import annotations

import json
from typing import Optional

from raydist.storage import filesystem, is_uri

TEST_METRICS_FILE = "test_metrics.json"


# ---- in one process (the Ray task's body) --------------------------------------------------------------


def evaluate_saved(saved: dict, dataset, *, device) -> dict:
    """A saved model's accuracy and loss on `dataset` (a loaded split), in this process."""
    import torch

    from raydist.config.fields import TrainConfig
    from raydist.data.sizes import classes_predicted
    from raydist.loop.evaluate import evaluate_model, uses_channels_last
    from raydist.models.transfer import load_trained_model

    cfg = TrainConfig.from_saved(saved["config"])
    # A checkpoint carries its config but not the two fields load_trained_model reads from a final model.
    net = load_trained_model({"model_name": cfg.model, "num_classes": classes_predicted(cfg), **saved})
    memory_format = torch.channels_last if uses_channels_last(cfg, device) else torch.contiguous_format
    sums = evaluate_model(net.to(device, memory_format=memory_format), dataset, cfg, device=device)
    count = int(sums.count.item())
    mirrored = {"acc_tta": sums.tta_correct.item() / count} if cfg.tta else {}  # apart from the plain figure
    return {"acc": sums.correct.item() / count, "loss": sums.loss.item() / count, "images": count, **mirrored}


def measure_files(paths: dict[str, str], *, cpus: float = 1) -> dict[str, dict]:
    """label -> saved model file, each evaluated on its data set's test split (loaded once, with the run's
    classes and channels) on this process's device: the GPU Ray gave it, else the CPU."""
    import torch

    from raydist.config.fields import TrainConfig
    from raydist.data.sizes import class_list
    from raydist.data.sources import load_split
    from raydist.runs.checkpoints import read_model_file

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cpus)))
    measured, loaded = {}, {}
    for label, path in paths.items():
        saved = read_model_file(path)
        cfg = TrainConfig.from_saved(saved["config"])
        key = (cfg.dataset, cfg.data_dir, cfg.classes, cfg.input_channels())
        if key not in loaded:
            loaded[key] = load_split(cfg.dataset, "test", device=device, data_dir=cfg.data_dir,
                                     classes=class_list(cfg), channels=cfg.input_channels())
        measured[label] = dict(evaluate_saved(saved, loaded[key], device=device), path=path,
                               epoch=saved.get("epoch") or (saved.get("metrics") or {}).get("epoch"))
    return measured


# ---- on the cluster ------------------------------------------------------------------------------------


def storage_uri(path: str, storage_path: str) -> str:
    """Ray hands back paths inside a bucket without their scheme; give it back."""
    if is_uri(storage_path) and not is_uri(path):
        return f"{storage_path.split('://')[0]}://{path}"
    return path


def write_json(path: str, content: dict) -> None:

    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as out:
        out.write((json.dumps(content, indent=2) + "\n").encode())


# ---- the line in the summary ---------------------------------------------------------------------------


def summary_line(measured: Optional[dict]) -> Optional[str]:
    """test acc: final model 71.2%, best checkpoint (epoch 7) 72.0% on the 10000 CIFAR-10 test images"""
    if measured is None:
        return None
    if "error" in measured:
        return f"test acc: not measured ({measured['error']})"
    parts = []
    for label, m in measured["models"].items():
        epoch = f" (epoch {m['epoch']})" if label != "final model" and m.get("epoch") else ""
        mirrored = f" ({m['acc_tta']:.1%} mirror-averaged)" if "acc_tta" in m else ""
        parts.append(f"{label}{epoch} {m['acc']:.1%}{mirrored}")
    of_classes = f" of classes {measured['classes']}" if measured.get("classes") else ""
    return f"test acc: {', '.join(parts)} on the {measured['images']} {measured['title']} test images{of_classes}"
