"""Multi-objective studies: each trial's value of every objective, the Pareto front, the study file's
`metric: [...]`, Optuna's multi-objective TPE behind the gate, and the picture."""

import warnings

import pytest

from raydist.errors import ConfigError
from raydist.output.pareto_plot import plot_pareto
from raydist.study.pareto import objective_values, pareto_front
from raydist.study.study_file import load_study, save_study

OBJECTIVES = [("val_acc", "max"), ("trainable_params", "min"), ("epoch_time_s", "min")]


def _row(trial_id, acc, params, seconds):
    return {"trial_id": trial_id, "best_val_acc": acc, "trainable_params": params, "epoch_time_s": seconds}


def test_the_front_is_every_trial_no_other_beats_everywhere():
    rows = [_row("a", 0.98, 900, 2.0),   # best accuracy
            _row("b", 0.95, 100, 2.0),   # smallest
            _row("c", 0.94, 200, 2.0),   # b beats it on both: off the front
            _row("d", 0.95, 100, 1.0),   # ties b on two, faster: b is now dominated
            _row("e", 0.90, 500, 0.5),   # fastest
            _row("f", None, 10, 0.1),    # unscored: never on the front, never dominating
            _row("g", 0.98, 900, 2.0)]   # a's twin: neither dominates the other
    assert pareto_front(rows, OBJECTIVES) == {"a", "d", "e", "g"}
    assert pareto_front(rows, OBJECTIVES[:2]) == {"a", "b", "d", "g"}
    # A diverged or failed trial's weights are not a model to use: off the front, and it pushes none off.
    failed = [{**_row("x", 0.99, 50, 0.1), "status": "error"}, {**_row("y", 0.99, 60, 0.2), "status": "diverged"}]
    assert pareto_front(rows + failed, OBJECTIVES) == {"a", "d", "e", "g"}


def test_a_trials_time_is_its_median_epoch_and_its_size_that_of_its_best_epoch():
    history = [{"epoch": 1, "epoch_time_s": 9.0, "trainable_params": 50, "val_acc": 0.5},  # start-up
               {"epoch": 2, "epoch_time_s": 1.0, "trainable_params": 80, "val_acc": 0.9},
               {"epoch": 3, "epoch_time_s": 1.2, "trainable_params": 80, "val_acc": 0.8}]
    values = objective_values(history, history[1], ["epoch_time_s", "images_per_s", "trainable_params"])
    assert values == {"epoch_time_s": 1.2, "images_per_s": None, "trainable_params": 80}


def test_the_picture_rings_the_front_on_each_objective(tmp_path):
    rows = [{**_row(t, acc, p, s), "pareto": t in ("a", "d")} for t, acc, p, s in
            (("a", 0.98, 900, 2.0), ("c", 0.94, 200, 2.5), ("d", 0.95, 100, 1.0))]
    plotted = plot_pareto(rows, str(tmp_path / "pareto.png"), OBJECTIVES)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert plotted["trainable_params"] == [("d", 100, 0.95, True), ("c", 200, 0.94, False), ("a", 900, 0.98, True)]
    assert [p[0] for p in plotted["epoch_time_s"]] == ["d", "a", "c"]


MULTI = """
metric: [val_acc, trainable_params]
search: {algorithm: optuna, initial_points: 2}
scheduler: {type: fifo}
fixed: {dataset: digits, model: tune_cnn, epochs: 3}
searched:
  lr: {loguniform: [0.01, 1.0]}
  model_args.l1: {choice: [8, 64]}
"""


def _write(tmp_path, text):
    path = tmp_path / "multi.yaml"
    path.write_text(text)
    return str(path)


def test_a_study_file_lists_its_objectives_and_a_saved_study_reads_back_the_same(tmp_path):
    text = MULTI + "  optimizer: {choice: [sgd, adamw]}\n  momentum: {uniform: [0.8, 0.95], when: {optimizer: sgd}}\n"
    study = load_study(_write(tmp_path, text))
    assert study.all_objectives() == [("val_acc", "max"), ("trainable_params", "min")]
    save_study(study, str(tmp_path / "experiment"))
    again = load_study(str(tmp_path / "experiment" / "study.yaml"))
    assert again.all_objectives() == study.all_objectives() and again.searched == study.searched
    assert again.searched["momentum"].when == ("optimizer", ("sgd",))  # the condition survives a resume


@pytest.mark.parametrize("edit, message", [
    (("metric: [val_acc, trainable_params]", "metric: [val_acc, parameters]"),
     "metric[1] 'parameters' is not one of: val_loss, train_acc, train_loss, epoch_time_s, images_per_s, "
     "trainable_params"),
    (("metric: [val_acc, trainable_params]", "metric: [trainable_params, val_acc]"),
     "metric 'trainable_params' is not one of: val_acc, val_loss, train_acc, train_loss (the first of a list)"),
    (("metric: [val_acc, trainable_params]", "metric: [val_acc, trainable_params]\nmode: [max, max]"),
     "mode max contradicts metric trainable_params (lower is better)"),
    (("metric: [val_acc, trainable_params]", "metric: [val_acc, trainable_params]\nmode: max"),
     "mode gives 1 direction(s) for 2 metric(s)"),
    (("algorithm: optuna", "algorithm: hyperopt"), "metric lists 2 objectives, which search.algorithm optuna models"),
    (("type: fifo", "type: asha"), "ASHA stops trials by one metric; give scheduler: {type: fifo} or --scheduler fifo"),
])
def test_a_bad_multi_objective_study_is_one_line(tmp_path, edit, message):
    old, new = edit
    text = MULTI
    assert old in text
    with pytest.raises(ConfigError) as caught:
        load_study(_write(tmp_path, text.replace(old, new, 1)))
    assert "\n" not in str(caught.value) and message in str(caught.value), str(caught.value)


def test_optunas_multi_objective_tpe_is_told_every_objective_and_a_non_finite_one_as_its_worst():
    from test_tune_search import _optuna_gate, _optuna_study

    from raydist.study.distributions import Distribution

    study = _optuna_study({"lr": Distribution("uniform", (0.0, 1.0))}, initial_points=2)
    study.objectives = (("trainable_params", "min"),)
    gate = _optuna_gate(study)
    a, b = gate.suggest("a"), gate.suggest("b")
    assert a and b
    gate.on_trial_complete("a", {"val_acc": 0.9, "trainable_params": 1000})
    gate.on_trial_complete("b", {"val_acc": 0.8, "trainable_params": float("nan")})
    record = gate.searcher._ot_study
    assert len(record.directions) == 2 and gate.results == 2
    assert [t.values for t in record.trials] == [[0.9, 1000], [0.8, gate.worst("min")]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the stand-in must not overflow Optuna's reference point
        assert gate.suggest("c") is not None  # TPE proposes from the two results


def test_optuna_is_told_each_trials_objectives_as_results_csv_holds_them_not_its_last_epochs():
    from test_tune_search import _optuna_gate, _optuna_study

    from raydist.study.distributions import Distribution

    study = _optuna_study({"lr": Distribution("uniform", (0.0, 1.0))}, initial_points=1)
    study.objectives = (("epoch_time_s", "min"), ("trainable_params", "min"))
    gate = _optuna_gate(study)
    gate.suggest("a")
    epochs = [{"epoch": 1, "val_acc": 0.90, "epoch_time_s": 9.0, "trainable_params": 10},  # start-up epoch
              {"epoch": 2, "val_acc": 0.95, "epoch_time_s": 1.0, "trainable_params": 20},  # the best
              {"epoch": 3, "val_acc": 0.80, "epoch_time_s": 1.4, "trainable_params": 30}]
    for result in epochs:
        gate.on_trial_result("a", result)
    gate.on_trial_complete("a", epochs[-1])  # what Tune hands over: the last result
    assert gate.searcher._ot_study.trials[0].values == [0.95, 1.4, 20]  # best, median epoch time, best's size
    assert gate.epochs == {}
