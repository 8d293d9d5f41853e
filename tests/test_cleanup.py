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
        from raydist.cluster import release_train_requests

        print(f"SIGKILL: requests Ray would keep for up to 180 s: {left}; released: "
              f"{release_train_requests({'stopped'})}")
