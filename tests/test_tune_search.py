"""The study's searchers in-process, with Ray's real HyperOptSearch (no cluster): TPE proposes beyond its
start-up points only once results exist, its state survives a resume, and a resume can change concurrency."""

import pytest
from ray import tune
from ray.tune.search.hyperopt import HyperOptSearch

from raydist.ray_edge import search
from raydist.ray_edge.search import RandomSearch, TPEGate

POINTS = [{"x": 0.05}, {"x": 0.5}, {"x": 0.95}]


def _gate(seed=0, *, points=POINTS, initial_points=3, max_concurrent=8):
    gate = TPEGate(HyperOptSearch(points_to_evaluate=points, n_initial_points=initial_points, random_state_seed=seed),
                   initial_points=initial_points, points_to_evaluate=len(points or []), max_concurrent=max_concurrent)
    gate.set_search_properties("score", "max", {"x": tune.uniform(0.0, 1.0)})
    return gate


def _propose(searcher, ids):
    return {i: c for i in ids if (c := searcher.suggest(i)) is not None}


def test_plain_hyperopt_proposes_every_concurrent_trial_without_a_result():
    """The defect the gate fixes: hyperopt counts pending trials toward its start-up points."""
    hyperopt = HyperOptSearch(n_initial_points=3, random_state_seed=0)
    hyperopt.set_search_properties("score", "max", {"x": tune.uniform(0.0, 1.0)})
    assert len(_propose(hyperopt, [f"t{i}" for i in range(8)])) == 8  # 8 at once, no result behind any


@pytest.mark.parametrize("best", [0.05, 0.95])
@pytest.mark.parametrize("seed", range(3))
def test_tpe_waits_for_the_start_up_results_then_models_them(best, seed):
    gate = _gate(seed)
    startup = _propose(gate, [f"t{i}" for i in range(8)])  # 8 trials at once allowed
    assert [c["x"] for c in startup.values()] == [0.05, 0.5, 0.95]  # the start-up points, and nothing more
    for trial_id, config in list(startup.items())[:2]:
        gate.on_trial_complete(trial_id, {"score": -abs(config["x"] - best)})
        assert gate.suggest(f"wait-{trial_id}") is None  # 1 or 2 results: still held
    last_id, last = list(startup.items())[2]
    gate.on_trial_complete(last_id, {"score": -abs(last["x"] - best)})
    proposals = []
    for i in range(2):  # TPE now, modelled on the results: it searches next to the best point
        config = gate.suggest(f"tpe{i}")
        proposals.append(config["x"])
        gate.on_trial_complete(f"tpe{i}", {"score": -abs(config["x"] - best)})
    assert all(abs(x - best) < 0.15 for x in proposals), proposals


def test_random_start_up_points_count_too_and_errors_never_deadlock_the_gate():
    gate = _gate(points=None)
    startup = _propose(gate, [f"t{i}" for i in range(8)])
    assert len(startup) == 3 and len({c["x"] for c in startup.values()}) == 3  # 3 random start-up points
    assert gate.suggest("held") is None
    for trial_id in startup:  # every start-up trial failed: holding on would wait forever
        gate.on_trial_complete(trial_id, error=True)
    assert gate.results == 0 and gate.suggest("after-errors") is not None


def test_failed_start_up_trials_are_replaced_at_the_studys_concurrency():
    """With 8 at once and 3 start-up points of which 2 fail, the 2 replacements (random start-up points
    to hyperopt, which leaves failed trials out of its count) run beside the third, not one at a time."""
    gate = _gate(points=None)
    startup = _propose(gate, [f"t{i}" for i in range(8)])
    first, second, third = startup
    gate.on_trial_complete(first, error=True)
    gate.on_trial_complete(second, error=True)
    replacements = _propose(gate, ["r0", "r1", "r2"])
    assert list(replacements) == ["r0", "r1"] and len(gate.live) == 3  # the third start-up trial still runs
    assert gate.suggest("held") is None  # three start-up trials out again: TPE waits for them to finish
    for trial_id, score in ((third, 0.2), ("r0", 0.3)):
        gate.on_trial_complete(trial_id, {"score": score})
    assert gate.results == 2 and gate.suggest("still-held") is None
    gate.on_trial_complete("r1", {"score": 0.1})
    assert gate.results == 3 and gate.suggest("tpe") is not None


@pytest.mark.parametrize("mode, worst", [("min", 1.7976931348623157e308), ("max", -1.7976931348623157e308)])
def test_a_non_finite_result_reaches_tpe_as_the_worst_value(mode, worst):
    """A diverged trial's NaN (or inf) metric: hyperopt would drop it ("TPE using 2/3 trials") and go on
    proposing where it diverged; it is told the worst finite value for the study's mode instead."""
    gate = TPEGate(HyperOptSearch(points_to_evaluate=POINTS, n_initial_points=3, random_state_seed=0),
                   initial_points=3, points_to_evaluate=3, max_concurrent=8)
    gate.set_search_properties("loss", mode, {"x": tune.uniform(0.0, 1.0)})
    ids = list(_propose(gate, ["a", "b", "c"]))
    gate.on_trial_complete(ids[0], {"loss": float("nan")})
    gate.on_trial_complete(ids[1], {"loss": float("inf") if mode == "min" else float("-inf")})
    gate.on_trial_complete(ids[2], {"loss": 0.5})
    losses = sorted(t["result"]["loss"] for t in gate.searcher._hpopt_trials.trials)
    sign = 1 if mode == "min" else -1  # HyperOptSearch hands hyperopt the negated metric under max
    assert losses == sorted([sign * worst, sign * worst, sign * 0.5])  # all three modelled, the two the worst
    assert gate.results == 3


def test_concurrency_limit_holds_and_frees_with_completions():
    gate = _gate(max_concurrent=2)
    assert len(_propose(gate, ["a", "b", "c"])) == 2
    gate.on_trial_complete("a", {"score": 0.1})
    assert gate.suggest("c") is not None


def test_a_restored_gate_keeps_its_trials_and_takes_the_concurrency_given_to_resume(tmp_path):
    from ray.tune.search import SearchGenerator

    gate = _gate(max_concurrent=1)
    first = gate.suggest("t0")
    SearchGenerator(gate).save_to_dir(str(tmp_path), session_str="s")  # what Tune saves with the experiment

    restored = _gate(max_concurrent=1)  # as Tune unpickles it from the experiment, before restoring
    try:
        search.set_resume_concurrency(3)
        SearchGenerator(restored).restore_from_dir(str(tmp_path))
    finally:
        search.set_resume_concurrency(None)
    assert restored.max_concurrent == 3 and restored.live == {"t0"} and restored.proposed == 1
    # The resumed trial's result reaches HyperOpt, which models the point it proposed before the resume.
    restored.on_trial_complete("t0", {"score": 0.7})
    done = [t for t in restored.searcher._hpopt_trials.trials if t["result"].get("loss") is not None]
    assert [t["misc"]["vals"]["x"][0] for t in done] == [first["x"]] and done[0]["result"]["loss"] == -0.7


@pytest.mark.slow
def test_random_search_takes_the_concurrency_given_to_resume():
    searcher = RandomSearch(max_concurrent=1, random_state=0)
    state = searcher.get_state()
    try:
        search.set_resume_concurrency(4)
        searcher.set_state(state)
    finally:
        search.set_resume_concurrency(None)
    assert searcher.max_concurrent == 4
