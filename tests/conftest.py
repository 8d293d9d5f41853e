"""Shared fixtures. One real Ray cluster per test session, started here with `ray start --head` (token
authentication on, dashboard on a free loopback port) and stopped here by its own process group."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

# The benchmarks' helpers that tests use too (image_trace: which images each rank trained on).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks"))

from leftovers import LEDGER, wait_for_free_cluster  # noqa: F401 - tests import the wait from here
from raydist.data.sizes import class_list, classes_predicted, input_side


@dataclasses.dataclass
class Cluster:
    address: str  # GCS host:port, what --address takes
    dashboard_url: str  # http://127.0.0.1:PORT
    token: str
    token_file: str

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


def _wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, log: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start --head` did not come up; its output:\n{open(log).read()[-3000:]}")
            time.sleep(0.5)


_TOKEN_DIR = tempfile.mkdtemp(prefix="raydist-test-token-")


def pytest_configure(config):
    """Token auth for the whole session, set before anything imports Ray (Ray reads the mode at import);
    every subprocess (the CLIs, submitted jobs) inherits it. The token is this session's own."""
    from raydist.ray_edge.session import CLUSTER_ENV

    token_file = os.path.join(_TOKEN_DIR, "auth_token")
    with open(token_file, "w") as fh:
        fh.write(os.urandom(32).hex())
    os.environ.update(CLUSTER_ENV)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_file)
    # Credentials for the S3-compatible server of tests/test_folder_s3.py, on every node of every cluster
    # the tests start (as a real cluster's nodes have theirs); that server accepts any. A test never
    # reaches real AWS: its URIs name the local server's endpoint.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")


def pytest_collection_modifyitems(session, config, items):
    """Every test that uses the session cluster is marked `cluster` (from its fixtures, so no test can forget
    it): `-m "not cluster and not own_cluster"` is the quick tier. Tests marked `own_cluster` start Ray
    clusters of their own (multi-node, autoscaling, local): run them first, before the session's cluster, so that
    the machine never holds two Ray instances at once (Ray's State API, which Train and Tune use to clean
    up, assumes one)."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)  # stable: order kept otherwise


SESSION_CLUSTER_WORK: list[str] = []  # what the session cluster ran, for the summary at the end


def _count_what_ran(cluster) -> None:
    """The session cluster's Ray Train runs and the actors it started, by class: the cluster tier's cost is
    mostly Ray Train's start, once per run (docs/testing.md)."""
    from collections import Counter

    import ray

    from raydist.ray_edge.session import dashboard_get

    if not ray.is_initialized():  # no test joined it
        return
    try:
        runs = dashboard_get(cluster.dashboard_url, "/api/train/v2/runs/v1").get("train_runs", [])
        from ray.util.state import list_actors

        actors = Counter(a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False))
    except Exception as error:  # a summary only: never fails the session
        SESSION_CLUSTER_WORK.append(f"session cluster: not counted ({error})")
        return
    names = ", ".join(f"{name} {count}" for name, count in actors.most_common(8))
    SESSION_CLUSTER_WORK.append(f"session cluster: {len(runs)} Ray Train runs; actors started: {names}")


def pytest_terminal_summary(terminalreporter):
    for line in SESSION_CLUSTER_WORK:
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    shutil.rmtree(_TOKEN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A head node with 2 CPUs, as a user starts one."""
    folder = tmp_path_factory.mktemp("ray-head")
    token_file = os.environ["RAY_AUTH_TOKEN_PATH"]
    token = open(token_file).read().strip()
    from raydist.ray_edge.session import free_port

    gcs_port, dashboard_port = free_port(), free_port()
    log = str(folder / "ray-start.log")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--disable-usage-stats"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,  # its own process group
        # Ray's metrics agent exports every 10 s by default: a short trial's gauges could come and go unseen.
        env={**os.environ, "RAY_metrics_report_interval_ms": "1000"})
    handle = Cluster(address=f"127.0.0.1:{gcs_port}", dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                     token=token, token_file=token_file)
    try:
        _wait_for_dashboard(handle.dashboard_url, token, proc, log)
        yield handle
    finally:
        import ray

        try:
            _count_what_ran(handle)
        finally:
            ray.shutdown()
        # `ray start --block` and everything it started share one process group: stop exactly that.
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # members left behind after the leader exited
        except ProcessLookupError:
            pass
        from clusters import session_members

        # Workers Ray moved into process groups of their own (an orphaned ray::TrainController was seen
        # running on after a CI run): they are still in the cluster's session.
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # `ray start` recorded this cluster as the machine's latest; stopped by signals, it leaves that record
        # behind, and the next `ray.init()` (or --address auto) would try to join a dead cluster for minutes.
        from raydist.ray_edge.session import address_file

        try:
            if open(address_file()).read().strip().endswith(f":{gcs_port}"):
                os.remove(address_file())
        except OSError:
            pass


@pytest.fixture(autouse=True)
def _session_cluster_whole(request):
    """Around every test that uses the session cluster: before it, the cluster must be whole (what an earlier
    test left is named with that test, see tests/leftovers.py); after it, whatever it left held is charged
    to it."""
    if "cluster" not in request.fixturenames:
        connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # the session's own connection
        yield
        if request.node.get_closest_marker("own_cluster") is None and not connected and "ray" in sys.modules:
            # A Ray instance started and left by a test not marked for one would be a second one on the
            # machine once the session cluster starts.
            assert not sys.modules["ray"].is_initialized(), "this test started Ray: mark it own_cluster (conftest)"
        return
    import ray

    request.getfixturevalue("ray_cluster")
    wait_for_free_cluster()
    yield
    if ray.is_initialized():
        LEDGER.after_test(request.node.nodeid)


@pytest.fixture(scope="session")
def ray_cluster(cluster):
    """The session cluster, joined by this test process; yields its address for `--address`."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cluster.address, logging_level="WARNING")
    return cluster.address


def digits_val_accuracy(saved: dict, mirror_averaged: bool = False) -> float:
    """Accuracy over the whole digits validation split (of the run's classes, fed as the run fed them) of a
    saved model (`model_final.pt`, `best_model.pt` or `checkpoint.pt` contents), evaluated in this process;
    `mirror_averaged`: of each image's logits averaged with its mirror's (--tta)."""
    import torch

    from raydist.data.augment import Augmenter
    from raydist.config.fields import TrainConfig
    from raydist.data.registry import DATASETS
    from raydist.data.sources import load_split
    from raydist.models.transfer import load_trained_model

    cfg = TrainConfig.from_dict(saved.get("config") or {})
    model = load_trained_model({"model_name": cfg.model, "num_classes": classes_predicted(cfg), **saved})
    channels = cfg.input_channels()
    val = load_split("digits", "val", classes=class_list(cfg), channels=channels)
    spec = DATASETS["digits"]
    augment = Augmenter("none", mean=spec.mean, std=spec.std, channels=channels, size=input_side(cfg))
    from raydist.loop.evaluate import uses_channels_last

    memory_format = torch.channels_last if uses_channels_last(cfg, torch.device("cpu")) else torch.contiguous_format
    model = model.to(memory_format=memory_format)  # evaluated as the run evaluated it
    with torch.no_grad():
        x = augment(val.images, train=False)
        logits = model(x.contiguous(memory_format=memory_format))
        if mirror_averaged:
            logits = (logits + model(x.flip(3).contiguous(memory_format=memory_format))) / 2
    return (logits.argmax(1) == val.labels).float().mean().item()


def start_tune(address: str, *args, **popen_kwargs) -> subprocess.Popen:
    """`python -m raydist.tune --address ADDRESS ARGS...` in the background, stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "raydist.tune", "--address", address, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen_kwargs)


def run_study_file(address: str, tmp_path, text: str, name: str):
    """`python -m raydist.tune` on a study file of `text` (tmp_path/NAME.yaml) that must finish: its stdout and
    its experiment folder (tmp_path/runs/NAME)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    proc = start_tune(address, "--search-space", str(path), "--storage-path", str(tmp_path / "runs"), "--name", name)
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-5000:]
    return stdout, tmp_path / "runs" / name


def best_trial_of(rows) -> dict:
    """The row results.csv should call the best, by the order docs and report.ranking state: the highest
    best_val_acc among trials that neither diverged nor failed; on a tie (common on 359 validation images, and
    certain under PBT, where an exploit copies a donor's epoch and its metrics) the lower val_loss_at_best,
    then the earlier best_epoch, then the lower trial id."""
    usable = [r for r in rows if r["status"] not in ("diverged", "error") and r["best_val_acc"] not in ("", None)]
    return min(usable, key=lambda r: (-float(r["best_val_acc"]), float(r["val_loss_at_best"] or "inf"),
                                      int(r["best_epoch"]), r["trial_id"]))


def read_csv(path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def pending_train_requests(dashboard_url: str, run_names=None) -> list[str]:
    """The resource requests Ray's AutoscalingCoordinator still holds for Ray Train runs (of `run_names`, or
    of any run), each as `train-<run id> (<run name>)`. A Train run cancels its own when it ends; a run whose
    controller was killed (a trial ASHA stopped, a study or run stopped from outside) leaves it for 180 s
    unless raydist gives it back (raydist.ray_edge.status.release_train_requests)."""
    import ray

    from raydist.ray_edge.session import dashboard_get

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:  # no Train run has started on this cluster yet
        return []
    held = ray.get(coordinator.__ray_call__.remote(lambda actor: [r for r in actor._ongoing_reqs
                                                                   if str(r).startswith("train-")]))
    names = {f"train-{run['id']}": run.get("name")
             for run in dashboard_get(dashboard_url, "/api/train/v2/runs/v1").get("train_runs", [])}
    return [f"{r} ({names.get(r)})" for r in held if run_names is None or names.get(r) in run_names]


@pytest.fixture
def run_root(tmp_path):
    return str(tmp_path / "runs")


class MetricsWatcher:
    """Reads every node's metrics endpoint (what Prometheus scrapes; the dashboard's Metrics view shows it)
    every 2 s while a job runs, keeping each raydist gauge seen: a gauge lives only as long as the process
    that sets it, so it is looked for while the run runs. Use as a context manager around the job."""

    def __init__(self, every_s: float = 2.0):
        import threading

        self.every_s, self.seen, self._stop = every_s, [], threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _watch(self):
        import re
        import urllib.request

        import ray

        line = re.compile(r'^(ray_raydist_\w+)\{(.*)\} (\S+)$')
        while not self._stop.is_set():
            for node in ray.nodes():
                if not node["Alive"]:
                    continue
                url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
                try:
                    text = urllib.request.urlopen(url, timeout=5).read().decode()
                except OSError:
                    continue
                for match in filter(None, map(line.match, text.splitlines())):
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
                    self.seen.append((match.group(1), labels, float(match.group(3))))
            self._stop.wait(self.every_s)

    def values(self, name: str, **labels) -> list[float]:
        return [value for metric, seen, value in self.seen
                if metric == name and all(seen.get(k) == v for k, v in labels.items())]
