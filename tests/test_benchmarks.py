"""Every benchmark script and `python -m raydist.scaling`, end to end on tiny CPU settings: they run, and
what they write holds what their docs say. No timing is asserted; the figures belong in docs/benchmarks.md.
The ones that need Ray run on the session cluster (--address); elastic_digits starts multi-node clusters of
its own (own_cluster)."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli import run_main
from conftest import read_csv

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
TINY_STUDY = """
num_samples: 2
search: {algorithm: random, seed: 0}
scheduler: {type: fifo}
fixed: {dataset: digits, model: resnet8, num_workers: 1, epochs: 2, warmup_epochs: 0, batch_size: 64}
searched:
  lr: {choice: [0.4, 0.8]}
"""


def _bench(name: str, *args, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_throughput_compares_raydists_loop_with_a_dataloader_loop(tmp_path):
    out = tmp_path / "throughput.json"
    result = _bench("throughput", "--device", "cpu", "--models", "resnet18", "resnet50_imagenet", "--batch-sizes", "8",
                    "--steps", "2", "--steps-224", "1", "--batch-224", "2", "--loader-workers", "1", "--threads", "1",
                    "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["input"], r["batch"]) for r in rows] == [("resnet18", 32, 8), ("resnet50_imagenet", 224, 2)]
    assert all(r["raydist_img_s"] > 0 and r["loop_img_s"] > 0 and r["mfu_raydist"] is None for r in rows)
    # training FLOPs counted from the layers: ResNet-18 (CIFAR) about 3 x 0.56 GFLOP, ResNet-50 about 3 x 4.1
    flops = {r["model"]: r["train_gflop_per_image"] for r in rows}
    assert 3.0 < flops["resnet18"] < 3.6 and 23 < flops["resnet50_imagenet"] < 26
    assert "| resnet18 | 32 | 8 | off | on |" in result.stdout


@pytest.mark.slow
def test_step_costs_measures_fake_generation_and_a_checkpoints_hold_up(tmp_path):
    out = tmp_path / "costs.json"
    _bench("step_costs", "--models", "resnet18", "--fake-batch", "2", "--repeats", "1", "--device", "cpu",
           "--ddp-epochs", "1", "--ddp-repeats", "1", "--json", str(out))
    measured = json.loads(out.read_text())
    assert measured["fake"]["int32_ms"] > 0 and measured["fake"]["int64_ms"] > 0
    (row,) = measured["checkpoints"]
    assert 85 < row["megabytes"] < 95  # ResNet-18's weights and momentum, 4 bytes each: 2 x 11.2M x 4
    assert row["async_s"] > 0 and row["sync_s"] > 0
    assert len(measured["ddp_buffer_sync"]["ratios"]) == 1


def test_data_pipeline_runs_every_pipeline_side_by_side(tmp_path):
    out = tmp_path / "pipeline.json"
    _bench("data_pipeline", "--images", "64", "--rounds", "1", "--min-seconds", "0", "--workers", "1",
           "--json", str(out))
    assert json.loads(out.read_text())


@pytest.mark.slow
def test_asha_fairness_runs_both_policies(tmp_path):
    result = _bench("asha_fairness", "--lrs", "0.4", "--short", "1", "--budget", "2")
    assert "budget" in result.stdout and "own" in result.stdout


def test_overhead_runs_plain_and_raydist_sides(ray_cluster, tmp_path):
    out = tmp_path / "overhead.json"
    _bench("overhead", "--epochs", "2", "--repeats", "1", "--cpus", "1", "--address", ray_cluster, "--json", str(out))
    (pair,) = json.loads(out.read_text())["series"]["1"]["pairs"]
    assert pair["ratio"] > 0 and len(pair["raydist"]["epoch_times"]) == 2


def test_ray_docs_peer_runs_both_loops_on_ray_train(ray_cluster, tmp_path):
    out = tmp_path / "peer.json"
    _bench("ray_docs_peer", "--epochs", "2", "--repeats", "1", "--address", ray_cluster, "--json", str(out))
    (pair,) = json.loads(out.read_text())["pairs"]
    assert len(pair["raydist"]["images_per_s"]) == len(pair["ray_docs"]["images_per_s"]) == 2


def test_hpo_efficiency_compares_the_searchers_and_where_trials_train(ray_cluster, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_STUDY)
    out = tmp_path / "hpo.json"
    # One side (the baseline every ratio is taken against): the other three differ only in the two flags
    # each passes to raydist.tune, whose searchers and schedulers have tests of their own.
    _bench("hpo_efficiency", "--search-space", str(tmp_path / "tiny.yaml"), "--seeds", "0", "--num-samples", "1",
           "--sides", "random+fifo", "--address", ray_cluster, "--json", str(out))
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"random+fifo"} and report["settings"]["sides"] == ["random+fifo"]
    (bar,) = [entry for label, entry in results["random+fifo"]["bars"].items() if label == "common"]
    assert bar["reached"] == "1 of 1" and bar["ratio_of_medians"] == 1.0  # the baseline against itself
    out = tmp_path / "paths.json"
    result = _bench("hpo_efficiency", "--search-space", str(tmp_path / "tiny.yaml"), "--trial-paths", "--repeats", "1",
                    "--address", ray_cluster, "--json", str(out))
    paths = json.loads(out.read_text())["result"]
    assert paths["in_process"]["startup_s"]["n"] == paths["trainer"]["startup_s"]["n"] == 2
    assert "wall time in_process / trainer" in result.stdout


def test_hpo_efficiency_counts_reports_in_the_order_they_were_made_and_only_those_tune_received(tmp_path,
                                                                                                    monkeypatch):
    """Two trials report within one whole second: Tune's `timestamp` ties them and sorting by it put the
    later report first (10 of 20 runs shifted by a trial-epoch); the exact `reported_unix` of each epoch
    (history.jsonl) orders them. An epoch a trial reported after ASHA stopped it (in history.jsonl, not in
    Tune's result.json) is not counted."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from hpo_efficiency import read_reports

    experiment = tmp_path / "study"
    trials = {"b": [(1, 1000.9, 0.5), (2, 1001.2, 0.7)], "a": [(1, 1000.4, 0.6), (2, 1000.95, 0.8)]}
    for trial_id, epochs in trials.items():
        folder = experiment / f"trial_{trial_id}"
        folder.mkdir(parents=True)
        history = [{"epoch": e, "val_acc": acc, "reported_unix": t} for e, t, acc in epochs]
        history.append({"epoch": 3, "val_acc": 0.9, "reported_unix": 1002.0})  # in flight when ASHA stopped it
        (folder / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        (folder / "result.json").write_text("".join(json.dumps(
            {"epoch": e, "val_acc": acc, "timestamp": int(t), "time_total_s": 1.0, "time_this_iter_s": 2.0,
             "epoch_time_s": 0.5}) + "\n" for e, t, acc in epochs))
    (experiment / "results.csv").write_text("trial_id,status,startup_s\nb,stopped early,1.5\na,stopped early,1.5\n")
    rows, reports, startups = read_reports(str(experiment))
    assert [(r[2], r[3]) for r in reports] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]  # by the exact time
    assert startups == [1.5, 1.5] and len(rows) == 2


@pytest.mark.own_cluster
def test_elastic_digits_runs_on_a_multi_node_cluster_of_its_own_and_plots_images_per_s(tmp_path):
    out, png = tmp_path / "elastic.json", tmp_path / "elastic.png"
    _bench("elastic_digits", "--runs", "fixed-2", "--epochs", "1", "--out", str(out), "--plot", str(png))
    (run,) = json.loads(out.read_text())["runs"]
    assert run["label"] == "fixed-2" and run["global_batch"] == [128]  # 2 workers x 32 x 2 accumulated
    assert [(e["epoch"], e["world_size"]) for e in run["epochs"]] == [(1, 2)] and run["epochs"][0]["images_per_s"] > 0
    assert 0 < run["final_val_acc"] <= 1 and run["wall_s"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_transfer_digits_runs_a_tiny_experiment(tmp_path):
    _bench("transfer_digits", "--seeds", "0", "--epochs", "1", "--lrs", "0.2", "--variants", "scratch", "linear",
           "--source-epochs", "1", "--accuracy-sizes", "--no-costs", "--input-size", "32", "--work-dir",
           str(tmp_path / "work"), "--plot", str(tmp_path / "t.png"), "--json", str(tmp_path / "t.json"))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_time_to_accuracy_runs_the_train_command_per_variant_and_seed_beside_the_svc_floor(ray_cluster, tmp_path):
    out = tmp_path / "t.json"
    (tmp_path / "data").mkdir()  # no CIFAR-10 in it: the GPU variant is left out in one line
    result = _bench("time_to_accuracy", "--seeds", "0", "--variants", "default", "tta", "cifar10_gpu", "--target",
                    "0.5", "--json", str(out), "--", "--address", ray_cluster, "--epochs", "4", "--num-workers", "1",
                    "--data-dir", str(tmp_path / "data"))
    figures = json.loads(out.read_text())
    assert figures["svc"]["accuracy"] > 0.97 and figures["svc"]["val"] == 359  # the floor, on raydist's split
    for name in ("default", "tta"):
        (run,) = figures["runs"][name]
        assert len(run["curve"]) == 4 and run["final"] > 0.5  # it learned (chance: 0.1)
        assert run["reached_s"] is not None and run["reached_s"] < run["wall_s"] and 0 < run["epoch_s"] < run["wall_s"]
    assert figures["runs"]["default"][0]["final_tta"] is None and figures["runs"]["tta"][0]["final_tta"] > 0.5
    assert "| tta |" in result.stdout and "SVC" in result.stdout
    assert "cifar10_gpu: left out: " in result.stdout and "not found in" in result.stdout
    assert set(figures["runs"]) == {"default", "tta"}


# ---- python -m raydist.scaling ---------------------------------------------------------------------------


def test_scaling_runs_its_grid_and_writes_the_table_the_csv_and_the_plots(ray_cluster, tmp_path):
    out = tmp_path / "scaling"
    result = subprocess.run([sys.executable, "-m", "raydist.scaling", "--address", ray_cluster, "--workers", "1", "2",
                             "--batch-sizes", "64", "--rules", "linear", "--target", "0.5", "--epochs", "4",
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv(out / "results.csv")
    assert [(r["workers"], r["global_batch"]) for r in rows] == [("1", "64"), ("2", "128")]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert float(rows[0]["efficiency"]) == pytest.approx(1.0)  # relative to itself
    for r in rows:  # the run stops at the target: the epoch it reached it, or it ran every epoch
        assert r["epochs_to_target"] == r["epochs_run"] or (r["epochs_to_target"] == "" and r["epochs_run"] == "4")
    assert any(r["epochs_to_target"] for r in rows)  # digits reaches 50% within 4 epochs
    table = (out / "results.md").read_text()
    assert "python -m raydist.scaling" in table and "| 2 | 64 | 128 | linear |" in table
    for png in ("throughput.png", "accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"w1-b64-linear", "w2-b64-linear"}


def test_scaling_grid_keeps_the_smallest_batchs_peak_lr_under_the_none_rule(tmp_path):
    from raydist.config.fields import TrainConfig
    from raydist.study.scaling_grid import build_grid

    points = build_grid(TrainConfig(lr=0.4, warmup_epochs=2), workers=[1, 2], batches=[32, 64], rules=["linear", "none"],
                        target=0.9, out=str(tmp_path))
    peak = {(p.rule, p.workers, p.batch): p.cfg.lr * p.global_batch / 256 for p in points}
    assert peak[("linear", 2, 64)] == pytest.approx(4 * peak[("linear", 1, 32)])  # scaled with the global batch
    assert {round(v, 9) for k, v in peak.items() if k[0] == "none"} == {round(0.4 * 32 / 256, 9)}
    assert {p.cfg.warmup_epochs for p in points if p.rule == "none"} == {0.0}
    assert {p.cfg.warmup_epochs for p in points if p.rule == "linear"} == {2.0}
    assert all(p.cfg.target_accuracy == 0.9 for p in points)


@pytest.mark.parametrize("scaling", ["per_256", "per_worker", "none"])
def test_the_scaling_grids_peak_lr_is_the_loops_own_under_every_lr_scaling(tmp_path, scaling):
    """lr_peak is what the loop trains at (cfg.lr x lr_scale at the run's global batch, as raydist.loop
    computes it): the smallest run at raydist.train's own peak for it, `linear` in proportion to the global
    batch from there, `none` at the smallest run's peak. The Horovod preset (per_worker, lr 0.1) was the
    case the table got wrong: `none` 1 x 128 trained at 0.025 while the column said 0.0125."""
    from raydist.config.fields import TrainConfig
    from raydist.config.rates import lr_scale
    from raydist.study.scaling_grid import build_grid
    from raydist.study.scaling_grid import row

    base = TrainConfig(lr=0.1, lr_scaling=scaling, warmup_epochs=1)
    points = build_grid(base, workers=[1, 2], batches=[32, 128], rules=["linear", "none"], target=0.9,
                        out=str(tmp_path))
    smallest = base.lr * lr_scale(dataclasses.replace(base, batch_size=32), 32)  # raydist.train's 1 x 32 run
    for p in points:
        trains_at = p.cfg.lr * lr_scale(p.cfg, p.cfg.global_batch_at(p.workers))  # the loop's peak LR
        assert row(p)["lr_peak"] == pytest.approx(trains_at)
        expected = smallest * p.global_batch / 32 if p.rule == "linear" else smallest
        assert trains_at == pytest.approx(expected), (p.rule, p.workers, p.batch)
    if scaling == "per_worker":
        none = {(p.workers, p.batch): row(p)["lr_peak"] for p in points if p.rule == "none"}
        assert none[(1, 128)] == pytest.approx(0.1) and none[(2, 128)] == pytest.approx(0.1)


def test_repeats_run_every_point_with_its_own_seed_and_the_table_shows_the_median_and_the_range(tmp_path):
    from raydist.config.fields import TrainConfig
    from raydist.study.scaling_grid import build_grid, summarize
    from raydist.output.scaling_report import markdown
    from raydist.scaling import measure

    points = build_grid(TrainConfig(lr=0.4, seed=5), workers=[1], batches=[64], rules=["linear"], target=0.9,
                        out=str(tmp_path), repeats=3)
    assert [(p.cfg.seed, p.cfg.name) for p in points] == [(5, "w1-b64-linear-s5"), (6, "w1-b64-linear-s6"),
                                                          (7, "w1-b64-linear-s7")]
    curves = ([0.5, 0.92], [0.5, 0.7, 0.95], [0.5, 0.6, 0.7, 0.8])  # reached at 2, at 3, never (4 epochs)
    for p, accs in zip(points, curves):
        measure(p, [{"epoch": e, "val_acc": a, "epoch_time_s": 2.0, "images_per_s": 100.0 + 10 * len(accs)}
                    for e, a in enumerate(accs, 1)], target=0.9)
    (r,) = summarize(points)
    assert (r["epochs_to_target"], r["epochs_to_target_range"], r["reached"]) == (3, (2, 3), 2)
    assert (r["epoch_seconds_to_target"], r["best_val_acc"], r["best_val_acc_range"]) == (6.0, 0.92, (0.8, 0.95))
    table = markdown(points, target=0.9, header="# t")
    assert "Each point ran 3 times (seeds 5-7)" in table
    assert "| 1 | 64 | 64 | linear | 0.1 | 1 | 130.0 (120.0-140.0) | — | 3 (2-3) | 6.0 (4.0-6.0) | 92.0% (80.0%-95.0%) " \
           "| 3 (2-4) | 2/3 |" in table
    # a point reached in fewer than half its repeats: its median is "not reached"
    measure(points[1], [{"epoch": 1, "val_acc": 0.5, "epoch_time_s": 2.0, "images_per_s": 100.0}], target=0.9)
    assert summarize(points)[0]["epochs_to_target"] is None


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], r"--repeats must be a positive integer, got 0"),
    (["--workers", "0"], r"--workers must be positive integers, got 0"),
    (["--target", "1.5"], r"--target must be a validation accuracy in \(0, 1\], got 1.5"),
    (["--batch-sizes", "2000"], r"1 worker\(s\) x batch 2000 \(linear\): --batch-size 2000 x --num-workers 1"),
    (["--lr", "-1"], r"--lr must be positive"),
    (["--workers", "two"], r"argument --workers: invalid int value: 'two'"),
    (["--batch-size", "64"], r"--batch-size: every run of the grid sets batch_size itself; use --batch-sizes"),
    (["--num-workers", "2"], r"--num-workers: every run of the grid sets num_workers itself; use --workers"),
    (["--target-accuracy", "0.5"], r"--target-accuracy: every run of the grid sets target_accuracy itself"),
    (["--name", "x"], r"--name: every run of the grid sets name itself; use --out"),
    (["--resume", "somewhere"], r"--resume: .*a scaling study starts every run afresh"),
    (["--wandb", "--wandb-id", "x"], r"--wandb-id: every run of the grid sets wandb_id itself; use --wandb alone"),
    (["--workers", "1", "1000", "--batch-sizes", "1"],
     r"the grid's largest run \(w1000-b1-linear\): --workers 1000 x --cpus-per-worker 1 asks for 1000 CPUs"),
    (["--storage-path", "elsewhere"], r"--storage-path elsewhere with --out .*: the runs go into --out"),
])
def test_scaling_bad_input_is_one_line_exit_2_before_any_cluster(tmp_path, capsys, monkeypatch, args, message):
    code, out, err = run_main("raydist.scaling", ["--out", str(tmp_path / "s"), *args], capsys, monkeypatch)
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert re.search(message, line), line
    assert not (tmp_path / "s").exists() and "Ray" not in out


def test_the_scaling_help_shows_its_own_flags_and_says_which_train_flags_pass_through(capsys, monkeypatch):
    """It printed all of raydist.train's help after its own, the flags it refuses included."""
    code, out, _ = run_main("raydist.scaling", ["--help"], capsys, monkeypatch)
    assert code == 0 and "--repeats" in out and "--batch-sizes" in out
    assert "passes through to every run (python -m raydist.train --help lists them), except --num-workers" in " ".join(
        out.split())
    assert not [line for line in out.splitlines() if line.lstrip().startswith(("--lr ", "--lr-scaling", "--model "))]


def test_the_scaling_process_exits_2_in_one_line_before_any_cluster(tmp_path):
    """The real process, once (the table above runs the same main() in this process)."""
    result = subprocess.run([sys.executable, "-m", "raydist.scaling", "--out", str(tmp_path / "s"), "--workers", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "raydist.scaling: error: --workers must be positive integers, got 0"
    assert not (tmp_path / "s").exists() and "Ray" not in result.stdout


def test_scaling_refuses_what_it_would_override_or_could_not_write_before_any_cluster(tmp_path, capsys, monkeypatch):
    def scaling(*args):
        code, out, err = run_main("raydist.scaling", list(args), capsys, monkeypatch)
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert "Ray" not in out
        return line

    (tmp_path / "grid.yaml").write_text("num_workers: 2\nepochs: 3\n")
    line = scaling("--config", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "a"))
    assert f"num_workers in {tmp_path / 'grid.yaml'}: every run of the grid sets num_workers itself" in line
    assert "the study writes its table and plots with local files" in scaling("--out", "s3://bucket/scaling")
    earlier = tmp_path / "earlier"
    (earlier / "w1-b64-linear").mkdir(parents=True)  # a run of an earlier study with the same grid point
    line = scaling("--workers", "1", "--batch-sizes", "64", "--rules", "linear", "linear", "--out", str(earlier))
    assert f"--out {earlier} holds run folders of an earlier study (w1-b64-linear); give a new --out" in line
    assert [p.name for p in earlier.iterdir()] == ["w1-b64-linear"] and not any((earlier / "w1-b64-linear").iterdir())
    assert not (tmp_path / "a").exists()


def test_folder_ingest_compares_the_streamed_and_memory_paths_with_a_dataloader(ray_cluster, tmp_path):
    out = tmp_path / "ingest.json"
    _bench("folder_ingest", "--images", "100", "--sizes", "40", "60", "--rounds", "1", "--folder",
           str(tmp_path / "folder"), "--address", ray_cluster, "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result["rates"]) == {"stream", "memory", "dataloader"}
    assert set(result["ratios"]) == {"stream/dataloader", "memory/dataloader"}
    assert result["streaming_memory"]["4x"]["images"] == 4 * result["streaming_memory"]["1x"]["images"]
    assert len(list((tmp_path / "folder").rglob("*.jpg"))) == 100


def test_the_model_table_in_the_docs_is_what_the_models_count():
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import model_sizes

    rows = model_sizes.table()
    text = (ROOT / "docs" / "models.md").read_text()
    assert all(row in text.splitlines() for row in rows), "rerun: python benchmarks/model_sizes.py --out docs/models.md"
    assert any(row.startswith("| wrn_dli") and "| 17,117,754 |" in row and "| 4.824 |" in row for row in rows)


def test_model_parallel_compares_unsplit_split_and_pipelined_sides(tmp_path):
    out = tmp_path / "model_parallel.json"
    result = _bench("model_parallel", "--smoke", "--threads", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["side"], r["stages"], r["micro_batches"]) for r in rows] == [
        ("unsplit", 1, 1), ("split", 2, 1), ("pipelined", 2, 2)]
    assert all(r["img_s"] > 0 for r in rows) and rows[0]["vs_unsplit"] == 1.0
    # ResNet-50 balanced by parameters: the cut after layer4's first block (tests/test_model_parallel.py)
    assert rows[1]["split"] == rows[2]["split"] == "stem..layer4.0 / layer4.1..head"
    assert "| pipelined | 2 | 2 | params | stem..layer4.0 / layer4.1..head |" in result.stdout


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_on_the_cpu_in_its_dry_run(tmp_path):
    """benchmarks/gpu_check.py, the one command that proves the GPU path when a GPU is lent: its dry run
    goes through every section's code at tiny sizes (the loop against the plain loop, the workload run
    with evaluation and checkpoints, fp16 with the scaler, the recipe pieces, the checkpoint write); on a
    machine without a GPU the full run refuses in one line."""
    out = tmp_path / "gpu.json"
    _bench("gpu_check", "--dry-run", "--json", str(out))
    result = json.loads(out.read_text())
    import torch

    assert result["dry_run"] and result["software"]["torch"] == torch.__version__
    (row,) = result["loop"]
    assert (row["model"], row["compile"]) == ("resnet8", "off")
    for side in ("raydist", "plain"):
        assert row[side]["images_per_s"] > 0 and row[side]["graphs"] == 0  # no compile asked for
    workload = result["workload"]
    assert [e["epoch"] for e in workload["epochs"]] == [1, 2] and all(e["images_per_s"] > 0 for e in workload["epochs"])
    assert result["fp16"]["images_per_s"] > 0 and result["fp16"]["final_scale"] > 0
    pieces = {row["piece"]: row for row in result["recipe"]}  # issue 33's training pieces in the same loop
    assert set(pieces) == {"mixup_cutmix", "randaugment_erase", "trivialaugment_erase", "ema", "clip_grad_norm"}
    assert all(row["images_per_s"] > 0 and row["over_plain_recipe"] > 0 for row in pieces.values())
    assert result["checkpoint"]["megabytes"] > 0 and result["ray"] is None
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--json", str(tmp_path / "x.json")],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert refused.returncode == 2 and refused.stderr.startswith("gpu_check: no GPU visible to torch")
    assert not (tmp_path / "x.json").exists()
