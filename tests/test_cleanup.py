"""A training run stopped from outside gives the session cluster back: Ctrl+C (SIGINT) and SIGKILL of the
`python -m raydist.train` driver mid-epoch, on a real 2-worker run. The cluster must be whole (no placement
group, every CPU free) within tests/leftovers.py's CLEANUP_PROMISE_S; the seconds it took are printed, and
docs/reliability.md records them. The study paths are tested where the studies run: Ctrl+C in
test_tune.py, SIGKILL in test_tune_resume.py, ASHA's stops in test_tune.py's study."""

import signal
import subprocess
import sys
import time

import pytest
from clusters import ConsoleLines
from conftest import pending_train_requests
from leftovers import CLEANUP_PROMISE_S, wait_for_free_cluster


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_a_training_run_stopped_mid_epoch_leaves_nothing_on_the_cluster(ray_cluster, cluster, tmp_path, how):
    proc = subprocess.Popen([sys.executable, "-m", "raydist.train", "--address", ray_cluster, "--num-workers", "2",
                             "--epochs", "30", "--storage-path", str(tmp_path / "runs"), "--name", "stopped"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = ConsoleLines(proc)
    try:
        console.wait_for(r"epoch +2/30", 300)  # both workers train: their group holds both CPUs
        stopped_at = time.monotonic()
        proc.send_signal(getattr(signal, how))
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        console.finish()
    assert code == (-signal.SIGKILL if how == "SIGKILL" else 130), console.text()[-3000:]
    if how == "SIGINT":  # Ctrl+C says so, in one line, and nothing after it hides the cause
        assert console.text().strip().splitlines()[-1].startswith("raydist.train: interrupted"), console.text()[-3000:]
    wait_for_free_cluster(timeout=CLEANUP_PROMISE_S)
    seconds = time.monotonic() - stopped_at
    print(f"{how}: the cluster was whole {seconds:.1f} s after the signal")
    left = pending_train_requests(cluster.dashboard_url, {"stopped"})
    if how == "SIGINT":  # raydist gives its run's autoscaling request back; after SIGKILL only Ray can (180 s)
        assert left == []
    else:  # what Ray does after 180 s, done now so that later tests find the cluster as a new one
        from raydist.ray_edge.status import release_train_requests

        print(f"SIGKILL: requests Ray would keep for up to 180 s: {left}; released: "
              f"{release_train_requests({'stopped'})}")


def test_a_study_gives_back_each_ended_trials_requests_at_once_again_later_and_every_trials_at_its_end(monkeypatch):
    """The study's callback (raydist.ray_edge.trials.train_requests_release) without a cluster: which Train runs it asks
    raydist.cluster to release, and when. The end-to-end proof is the elastic study test in test_tune.py."""
    import types

    from ray import cloudpickle

    from raydist.ray_edge import status
    from raydist.ray_edge import trials as study_trials

    asked = []
    monkeypatch.setattr(status, "release_train_requests", lambda names: asked.append(sorted(names)) or [])
    monkeypatch.setattr(study_trials, "RELEASE_AFTER_S", (0.0, 0.3))
    callback = study_trials.train_requests_release("digits_quick")
    trials = [types.SimpleNamespace(trial_id=t) for t in ("a_00000", "a_00001", "a_00002")]
    for trial in trials:
        callback.on_trial_start(iteration=1, trials=trials, trial=trial)
    callback.on_trial_complete(iteration=2, trials=trials, trial=trials[0])  # e.g. stopped by ASHA
    callback.on_trial_error(iteration=2, trials=trials, trial=trials[1])
    callback.on_step_end(iteration=2, trials=trials)  # both at once, in the callback's thread
    cloudpickle.dumps(callback)  # Tune saves its callbacks with the experiment (cloudpickle), thread and all
    callback.on_step_end(iteration=3, trials=trials)  # too early for the second time: nothing new
    time.sleep(0.4)
    callback.on_step_end(iteration=4, trials=trials)  # the second time, after the controllers are surely gone
    callback.on_step_end(iteration=5, trials=trials)  # never a third
    callback.release_all()  # the study's end: every trial it started, the one still running too
    assert asked == [["digits_quick.a_00000", "digits_quick.a_00001"]] * 2 + [
        ["digits_quick.a_00000", "digits_quick.a_00001", "digits_quick.a_00002"]]
