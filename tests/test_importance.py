"""What mattered in a study: fANOVA (Optuna's evaluator) over the trials' rows, as results.csv holds them."""

import random
import sys

import pytest

from raydist.study.distributions import Distribution
from raydist.study.importance import field_importance
from raydist.study.study import Study

SEARCHED = {"lr": Distribution("loguniform", (0.001, 1.0)),
            "batch_size": Distribution("choice", (32, 64, 128)),
            "label_smoothing": Distribution("quniform", (0.0, 0.2, 0.05)),
            "warmup_epochs": Distribution("randint", (0, 3))}


def _study(searched=SEARCHED, mode="max"):
    study = Study(path="t.yaml", fixed={}, searched=dict(searched), given_name="t")
    study.metric, study.mode = ("val_acc", "max") if mode == "max" else ("val_loss", "min")
    return study


def _rows(n, score, seed=0):
    """n trials drawn at random from SEARCHED, scored by `score(values)`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        values = {"lr": 10 ** rng.uniform(-3, 0), "batch_size": rng.choice([32, 64, 128]),
                  "label_smoothing": rng.choice([0.0, 0.05, 0.1, 0.15, 0.2]), "warmup_epochs": rng.randint(0, 3)}
        rows.append({"trial_id": f"t{i}", "status": "finished", **values, "best_val_acc": score(values)})
    return rows


@pytest.mark.parametrize("seed", range(3))
def test_the_field_the_metric_follows_takes_most_of_the_share(seed):
    import math

    # accuracy peaks at lr 0.1 and ignores everything else but a little of the batch size
    rows = _rows(30, lambda v: 0.95 - 0.1 * abs(math.log10(v["lr"]) + 1) - 0.002 * (v["batch_size"] == 128), seed)
    found = field_importance(rows, _study())
    assert found.trials == 30 and set(found.shares) == set(SEARCHED)
    assert list(found.shares)[0] == "lr" and found.shares["lr"] > 0.8
    assert sum(found.shares.values()) == pytest.approx(1.0)
    assert found.line().startswith("what mattered (fANOVA over 30 scored trials): lr ")


def test_unscored_trials_are_left_out_and_too_few_say_nothing():
    rows = _rows(6, lambda v: v["lr"])
    for row in rows[:3]:
        row["best_val_acc"] = None if row["trial_id"] != "t0" else float("nan")
    assert field_importance(rows, _study()).trials == 3
    rows[3]["best_val_acc"] = None
    assert field_importance(rows, _study()) is None  # 2 scored trials
    assert field_importance(_rows(10, lambda v: v["lr"]), _study({"lr": SEARCHED["lr"]})) is None  # one field: 100%


def test_without_optuna_a_study_has_no_importance_and_no_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert field_importance(_rows(10, lambda v: v["lr"]), _study()) is None


def test_grid_values_with_tunes_rounding_noise_and_conditional_fields_are_read_as_the_study_samples_them():
    searched = {"lr": Distribution("qloguniform", (0.1, 0.7, 0.1)),
                "batch_size": Distribution("choice", (32, 64)),
                "momentum": Distribution("uniform", (0.8, 0.95), when=("batch_size", (32,)))}
    rows = [{"trial_id": f"t{i}", "lr": lr, "batch_size": b, "momentum": 0.9 if b == 32 else None,
             "best_val_acc": 0.5 + lr / 2}
            for i, (lr, b) in enumerate([(0.7000000000000001, 32), (0.1, 64), (0.30000000000000004, 32),
                                         (0.5, 64), (0.2, 32)])]
    found = field_importance(rows, _study(searched))
    assert set(found.shares) == {"lr", "batch_size"} and found.shares["lr"] > 0.5
