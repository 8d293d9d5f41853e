"""The study report without Ray: how each trial ended, the best one, results.csv, the pictures and the table."""

import csv
import math
import struct

import pytest

from raydist.output import report, search_plot


def _history(accs, *, stop_reason=""):
    history = [{"epoch": i + 1, "val_acc": a, "val_loss": 1 - a, "train_loss": 1.0, "train_acc": a, "lr": 0.1,
                "epoch_time_s": 1.0, "images_per_s": 100.0, "stop_reason": ""} for i, a in enumerate(accs)]
    if history:
        history[-1]["stop_reason"] = stop_reason
    return history


def _row(trial_id, accs, planned, **kwargs):
    return report.trial_row(trial_id, {"lr": 0.1}, _history(accs) if accs else [], planned_epochs=planned,
                            metric="val_acc", mode="max", **kwargs)


def test_how_a_trial_ended():
    assert _row("a", [0.5, 0.7, 0.9], 3)["status"] == report.FINISHED
    assert _row("b", [0.5, 0.4], 6)["status"] == report.STOPPED
    assert _row("c", [0.5, 0.4], 6, interrupted=True)["status"] == report.UNFINISHED
    assert _row("d", [], 6, error="OutOfMemoryError: CUDA out of memory")["status"] == report.ERROR
    target = report.trial_row("e", {}, _history([0.5, 0.8], stop_reason="target_accuracy"), planned_epochs=9,
                              metric="val_acc", mode="max")
    assert target["status"] == report.TARGET
    diverged = report.trial_row("f", {}, _history([0.1], stop_reason="non_finite_loss"), planned_epochs=9,
                                metric="val_acc", mode="max")
    assert diverged["status"] == report.DIVERGED


def test_final_and_best_metric_and_the_best_trial():
    rows = [_row("a", [0.5, 0.9, 0.8], 3), _row("b", [0.6, 0.85], 2), _row("c", [], 4, error="boom")]
    a = rows[0]
    assert (a["final_val_acc"], a["best_val_acc"], a["best_epoch"], a["epochs_run"]) == (0.8, 0.9, 2, 3)
    assert report.best_row(rows, "val_acc", "max")["trial_id"] == "a"
    loss_rows = [report.trial_row(t, {}, _history(accs), planned_epochs=2, metric="val_loss", mode="min")
                 for t, accs in (("a", [0.5, 0.6]), ("b", [0.7, 0.65]))]
    assert report.best_row(loss_rows, "val_loss", "min")["trial_id"] == "b"  # lowest loss: 1 - 0.7
    assert report.best_row([rows[2]], "val_acc", "max") is None


def test_results_csv_one_row_per_trial(tmp_path):
    rows = [_row("a", [0.5, 0.9], 2), _row("b", [0.3], 4), _row("c", [], 4, error="ValueError: x")]
    report.write_csv(rows, str(tmp_path / "results.csv"), searched=["lr"])
    with open(tmp_path / "results.csv", newline="") as fh:
        read = list(csv.DictReader(fh))
    assert [r["trial_id"] for r in read] == ["a", "b", "c"]
    assert read[0]["lr"] == "0.1" and read[0]["best_val_acc"] == "0.9" and read[1]["status"] == report.STOPPED
    assert read[2]["error"] == "ValueError: x" and read[2]["best_val_acc"] == ""


def test_curves_csv_and_png_hold_every_epoch_of_every_trial(tmp_path):
    histories = {"a": _history([0.5, 0.7, 0.9]), "b": _history([0.2, 0.3]), "c": []}
    report.write_curves_csv(histories, str(tmp_path / "curves.csv"))
    with open(tmp_path / "curves.csv", newline="") as fh:
        read = list(csv.DictReader(fh))
    assert [(r["trial_id"], r["epoch"]) for r in read] == [("a", "1"), ("a", "2"), ("a", "3"), ("b", "1"), ("b", "2")]
    plotted = report.plot_learning_curves(histories, str(tmp_path / "curves.png"), metric="val_acc", best="a")
    assert plotted == {"a": [(1, 0.5), (2, 0.7), (3, 0.9)], "b": [(1, 0.2), (2, 0.3)]}
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_table_lists_the_best_first(tmp_path):
    rows = [_row("low", [0.2, 0.3], 2), _row("high", [0.8, 0.95], 2), _row("broken", [], 2, error="x")]
    table = report.format_table(rows, searched=["lr"], metric="val_acc", mode="max").splitlines()
    assert table[0].split()[:3] == ["trial_id", "status", "lr"]
    assert [line.split()[0] for line in table[1:]] == ["high", "low", "broken"]
    assert "95.00%" in table[1]


@pytest.mark.parametrize("value, column, text", [(0.9512, "best_val_acc", "95.12%"), (12.7, "seconds", "13"),
                                                 (None, "lr", "-"), (0.000123456, "lr", "0.0001235")])
def test_cells(value, column, text):
    assert report.cell(column, value) == text


def test_a_diverged_or_failed_trial_is_never_the_best():
    diverged = report.trial_row("nan", {}, _history([0.99, 0.1], stop_reason="non_finite_loss"), planned_epochs=4,
                                metric="val_acc", mode="max")
    failed = _row("oom", [0.98], 4, error="OutOfMemoryError: CUDA out of memory")
    fair = _row("ok", [0.5, 0.8], 2)
    assert (diverged["best_val_acc"], failed["best_val_acc"]) == (0.99, 0.98)  # they did score higher once
    assert report.best_row([diverged, failed, fair], "val_acc", "max")["trial_id"] == "ok"
    assert report.best_row([diverged, failed], "val_acc", "max") is None


def test_best_epoch_is_the_first_of_equals_and_the_weights_epoch_is_reported():
    row = _row("a", [0.5, 0.9, 0.9, 0.7], 4, checkpoint="/ckpt/4", weights_epoch=4)
    assert (row["best_epoch"], row["weights_epoch"], row["checkpoint"]) == (2, 4, "/ckpt/4")
    assert report.best_record(_history([0.5, 0.9, 0.9]), "val_acc", "max")["epoch"] == 2
    assert report.best_record(_history([0.5, 0.2, 0.2]), "val_loss", "min")["epoch"] == 1  # loss = 1 - acc
    assert report.best_record([{"epoch": 1, "val_acc": float("nan")}], "val_acc", "max") is None


def _png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the file is a PNG at all."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_run_curves_plot_each_epoch_once_from_its_last_record_and_skip_non_finite(tmp_path):
    def epoch(e, loss, acc, lr, world_size=2):
        return {"epoch": e, "train_loss": 2.0 / e, "train_acc": acc - 0.05, "val_loss": loss, "val_acc": acc,
                "lr": lr, "world_size": world_size, "epoch_time_s": 10.0}

    history = [epoch(1, 2.0, 0.30, 0.1), epoch(2, 1.5, 0.45, 0.1), epoch(3, 1.4, 0.50, 0.05),
               epoch(3, 1.2, 0.55, 0.05, world_size=1),  # restarted after a failure in epoch 3, on one worker
               epoch(4, 1.0, 0.62, 0.05, world_size=1), epoch(5, math.nan, 0.10, 0.01, world_size=1),
               epoch(6, 0.9, 0.66, 0.01, world_size=1)]
    plotted = report.plot_run_curves(history, str(tmp_path / "curves.png"), title="run")
    assert _png_size(tmp_path / "curves.png") == (1210, 495)  # figsize (11, 4.5) at 110 dpi
    assert plotted["val_loss"] == [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.0), (6, 0.9)]  # epoch 3's last; no NaN
    assert [e for e, _ in plotted["train_loss"]] == [1, 2, 3, 4, 5, 6]  # the diverged epoch's other values stay
    assert plotted["val_acc"][2] == (3, 0.55) and plotted["train_acc"][2] == (3, pytest.approx(0.50))
    assert plotted["lr"] == [(1, 0.1), (2, 0.1), (3, 0.05), (4, 0.05), (5, 0.01), (6, 0.01)]
    assert plotted["world_size"] == [(3, 1)]  # from the record of epoch 3 that stands


def _search_rows():
    """5 trials: lr (log scale), a string choice and an int; finished, stopped early and failed ones."""
    trials = [("a", 3e-4, "lp-ft", 64, [0.6, 0.8, 0.9], None), ("b", 1e-2, "full", 128, [0.5, 0.7, 0.75], None),
              ("c", 1e-1, "head", 32, [0.3], None), ("d", 1e-3, "full", 32, [0.4, 0.5], None),
              ("e", 5e-2, "lp-ft", 128, [], "OutOfMemoryError: CUDA out of memory")]
    return [report.trial_row(t, {"lr": lr, "finetune": finetune, "batch_size": batch}, _history(accs),
                             planned_epochs=3, metric="val_acc", mode="max", error=error)
            for t, lr, finetune, batch, accs, error in trials]


def test_search_values_one_point_per_trial_in_every_panel(tmp_path):
    rows = _search_rows()
    assert [r["status"] for r in rows] == [report.FINISHED, report.FINISHED, report.STOPPED, report.STOPPED,
                                           report.ERROR]
    plotted = search_plot.plot_search_values(rows, str(tmp_path / "search_values.png"),
                                        searched=["lr", "finetune", "batch_size"], metric="val_acc", mode="max",
                                        log_scale={"lr"}, title="study")
    assert _png_size(tmp_path / "search_values.png") == (1320, 495)  # 3 panels of 4 x 3.5 in, + 1 in, 110 dpi
    assert set(plotted) == {"lr", "finetune", "batch_size"}
    assert all(len(points) == 5 for points in plotted.values())
    assert plotted["lr"] == [("a", 3e-4, 0.9, report.FINISHED), ("d", 1e-3, 0.5, report.STOPPED),
                             ("b", 1e-2, 0.75, report.FINISHED), ("e", 5e-2, None, report.ERROR),
                             ("c", 1e-1, 0.3, report.STOPPED)]  # left to right; the failed trial has no y
    # categories sorted by name, their trials left to right
    assert [(t, x) for t, x, _, _ in plotted["finetune"]] == [("b", "full"), ("d", "full"), ("c", "head"),
                                                             ("a", "lp-ft"), ("e", "lp-ft")]
    assert [x for _, x, _, _ in plotted["batch_size"]] == [32, 32, 64, 128, 128]


def test_search_values_wrap_to_three_panels_a_row(tmp_path):
    rows = [{**r, "pretrained": i % 2 == 0} for i, r in enumerate(_search_rows())]
    plotted = search_plot.plot_search_values(rows, str(tmp_path / "search_values.png"),
                                        searched=["lr", "finetune", "batch_size", "pretrained"], metric="val_acc",
                                        mode="max")
    assert _png_size(tmp_path / "search_values.png") == (1320, 880)  # 2 rows of panels
    assert [x for _, x, _, _ in plotted["pretrained"]] == [False, False, True, True, True]  # a bool: categories


def test_empty_pictures_are_still_valid_pngs(tmp_path):
    plotted = report.plot_run_curves([], str(tmp_path / "curves.png"))
    assert _png_size(tmp_path / "curves.png") == (1210, 495)
    assert all(points == [] for points in plotted.values())
    assert search_plot.plot_search_values(_search_rows(), str(tmp_path / "nothing.png"), searched=[], metric="val_acc",
                                     mode="max") == {}
    assert _png_size(tmp_path / "nothing.png") == (880, 495)  # one panel: 8 in wide at least, 3.5 + 1 in high
    no_trials = search_plot.plot_search_values([], str(tmp_path / "no_trials.png"), searched=["lr"], metric="val_acc",
                                          mode="max", log_scale={"lr"})
    assert no_trials == {"lr": []} and _png_size(tmp_path / "no_trials.png") == (880, 495)


def test_summarize_draws_log_axes_for_the_log_distributions_there_are():
    from raydist.ray_edge import results
    from raydist.study.distributions import DISTRIBUTIONS

    assert set(results.LOG_KINDS) <= set(DISTRIBUTIONS)
    assert {k for k in DISTRIBUTIONS if "log" in k} == set(results.LOG_KINDS)
