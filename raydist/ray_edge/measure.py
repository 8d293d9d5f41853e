"""The test split, measured once at the end on the cluster (a Ray task where the data is): a run's final
model and best checkpoint, a study's best model; written to test_metrics.json beside them.
"""

from __future__ import annotations

from typing import Optional

from raydist.final_eval import TEST_METRICS_FILE, measure_files, storage_uri, write_json


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
    from raydist.loop.recipe import DIVERGED
    from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE

    if not has_test_split(cfg.dataset):
        return None
    run_dir = storage_uri(f"{cfg.storage_path}/{cfg.name}", cfg.storage_path)
    paths = {}
    if summary.history and summary.history[-1].get("stop_reason") != DIVERGED:
        paths["final model"] = f"{run_dir}/{FINAL_MODEL_FILE}"
    if summary.best_checkpoint:
        paths["best checkpoint"] = f"{storage_uri(summary.best_checkpoint, cfg.storage_path)}/{CHECKPOINT_FILE}"
    if not paths:
        return None
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else _cluster_has_gpus()
    return _measure_and_write(paths, cfg, use_gpu=use_gpu, cpus=cfg.cpus_per_worker, folder=run_dir)


def measure_study(result) -> Optional[dict]:
    """A finished study's exported best model (best_model.pt) on the test split, once; written beside it."""
    from raydist.config.fields import TrainConfig
    from raydist.data.registry import has_test_split
    from raydist.runs.checkpoints import read_model_file

    if not result.best_model or result.interrupted:  # an interrupted study measures when it is finished
        return None
    try:
        cfg = TrainConfig.from_saved(read_model_file(result.best_model)["config"])
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
    write_json(f"{folder}/{TEST_METRICS_FILE}", measured)
    return measured
