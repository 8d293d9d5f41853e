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
    from raydist.data.sizes import classes_predicted
    import torch

    from raydist.config.fields import TrainConfig
    from raydist.loop.evaluate import evaluate_model, uses_channels_last
    from raydist.models.transfer import load_trained_model

    cfg = TrainConfig.from_dict(saved["config"])
    # A checkpoint carries its config but not the two fields load_trained_model reads from a final model.
    net = load_trained_model({"model_name": cfg.model, "num_classes": classes_predicted(cfg), **saved})
    memory_format = torch.channels_last if uses_channels_last(cfg, device) else torch.contiguous_format
    sums = evaluate_model(net.to(device, memory_format=memory_format), dataset, cfg, device=device)
    count = int(sums.count.item())
    return {"acc": sums.correct.item() / count, "loss": sums.loss.item() / count, "images": count}


def measure_files(paths: dict[str, str], *, cpus: float = 1) -> dict[str, dict]:
    """label -> saved model file, each evaluated on its data set's test split (loaded once, with the run's
    classes and channels) on this process's device: the GPU Ray gave it, else the CPU."""
    from raydist.runs.checkpoints import read_model_file
    from raydist.data.sizes import class_list
    import torch

    from raydist.config.fields import TrainConfig
    from raydist.data.sources import load_split

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cpus)))
    measured, loaded = {}, {}
    for label, path in paths.items():
        saved = read_model_file(path)
        cfg = TrainConfig.from_dict(saved["config"])
        key = (cfg.dataset, cfg.data_dir, cfg.classes, cfg.input_channels())
        if key not in loaded:
            loaded[key] = load_split(cfg.dataset, "test", device=device, data_dir=cfg.data_dir,
                                     classes=class_list(cfg), channels=cfg.input_channels())
        measured[label] = dict(evaluate_saved(saved, loaded[key], device=device), path=path,
                               epoch=saved.get("epoch") or (saved.get("metrics") or {}).get("epoch"))
    return measured


# ---- on the cluster ------------------------------------------------------------------------------------


def measure_on_cluster(paths: dict[str, str], *, use_gpu: bool, cpus: float) -> dict[str, dict]:
    """measure_files as one Ray task on a node of the cluster (the data sets live on the worker nodes)."""
    import ray

    task = ray.remote(measure_files).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0, max_retries=0)
    return ray.get(task.remote(paths, cpus=cpus))


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _cause(exc: BaseException) -> str:
    """One line: the task's own error, not Ray's wrapper around it."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).splitlines()[0] if str(cause) else ""
    from raydist.errors import DatasetNotFound

    return text if isinstance(cause, (DatasetNotFound, OSError)) else f"{type(cause).__name__}: {text}"


def measure_run(cfg, summary) -> Optional[dict]:
    """The run's final model and best checkpoint on the test split, once; written to the run folder. None
    when the data set has no test split or there is nothing saved to measure (a diverged run without a
    checkpoint); {"error": ...} when the measurement failed (the run itself stands)."""
    from raydist.data.registry import has_test_split
    from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE
    from raydist.loop.recipe import DIVERGED

    if not has_test_split(cfg.dataset):
        return None
    run_dir = _uri(f"{cfg.storage_path}/{cfg.name}", cfg.storage_path)
    paths = {}
    if summary.history and summary.history[-1].get("stop_reason") != DIVERGED:
        paths["final model"] = f"{run_dir}/{FINAL_MODEL_FILE}"
    if summary.best_checkpoint:
        paths["best checkpoint"] = f"{_uri(summary.best_checkpoint, cfg.storage_path)}/{CHECKPOINT_FILE}"
    if not paths:
        return None
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else _cluster_has_gpus()
    return _measure_and_write(paths, cfg, use_gpu=use_gpu, cpus=cfg.cpus_per_worker, folder=run_dir)


def measure_study(result) -> Optional[dict]:
    """A finished study's exported best model (best_model.pt) on the test split, once; written beside it."""
    from raydist.runs.checkpoints import read_model_file
    from raydist.config.fields import TrainConfig
    from raydist.data.registry import has_test_split

    if not result.best_model or result.interrupted:  # an interrupted study measures when it is finished
        return None
    try:
        cfg = TrainConfig.from_dict(read_model_file(result.best_model)["config"])
    except Exception as exc:  # noqa: BLE001 - the study stands; say why there is no test figure
        return {"error": _cause(exc)}
    if not has_test_split(cfg.dataset):
        return None
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else _cluster_has_gpus()
    return _measure_and_write({"best model": result.best_model}, cfg, use_gpu=use_gpu, cpus=cfg.cpus_per_worker,
                              folder=result.experiment_path)


def _measure_and_write(paths: dict[str, str], cfg, *, use_gpu: bool, cpus: float, folder: str) -> dict:
    from raydist.data.registry import DATASETS

    try:
        models = measure_on_cluster(paths, use_gpu=use_gpu, cpus=cpus)
    except Exception as exc:  # noqa: BLE001 - the trained models stand; say why there is no test figure
        return {"error": _cause(exc)}
    images = next(iter(models.values()))["images"]
    measured = {"dataset": cfg.dataset, "title": DATASETS[cfg.dataset].title, "split": "test", "images": images,
                "classes": cfg.classes, "models": models}
    _write_json(f"{folder}/{TEST_METRICS_FILE}", measured)
    return measured


def _uri(path: str, storage_path: str) -> str:
    """Ray hands back paths inside a bucket without their scheme; give it back."""
    if is_uri(storage_path) and not is_uri(path):
        return f"{storage_path.split('://')[0]}://{path}"
    return path


def _write_json(path: str, content: dict) -> None:

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
        parts.append(f"{label}{epoch} {m['acc']:.1%}")
    of_classes = f" of classes {measured['classes']}" if measured.get("classes") else ""
    return f"test acc: {', '.join(parts)} on the {measured['images']} {measured['title']} test images{of_classes}"
