"""Real multi-node Ray clusters on one machine, for tests: an autoscaling one whose worker nodes start and
stop as demand asks (Ray's fake_multinode provider), started and stopped by this module only.

    cluster = FakeAutoscalingCluster({"cpu2": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                                               "max_workers": 2}}, folder=tmp_path)
    cluster.start()                  # `ray start --head --block --autoscaling-config=...`, own process group
    ...                              # --address cluster.address; cluster.config is the autoscaler's config
    cluster.stop()                   # that process group and every process of this cluster, by pid

Why not ray.cluster_utils.AutoscalingCluster: its start() and shutdown() run `ray stop --force`, which
kills every Ray process of this user on the machine (other sessions' clusters included), and it reads a
fake_multi_node/example.yaml that the ray 2.60 wheel lacks. The base config below is that file's content
(ray-project/ray python/ray/autoscaler/_private/fake_multi_node/example.yaml). Ray's v2 autoscaler also
reads that missing file, so these clusters run the v1 autoscaler (the default).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from raydist.ray_edge.session import free_port

HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head node type
FAKE_BASE = {
    "cluster_name": "fake_multinode", "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {}, "head_node_type": HEAD_TYPE, "auth": {},
    "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _sid(pid: int) -> Optional[int]:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def session_members(sid: int) -> set[int]:
    """Every live process of the session that a cluster's `ray start` leads (started with
    start_new_session). Ray moves some workers (actors such as Ray Train's controller) into process groups
    of their own, so killing the cluster's process group can leave them running; they stay in its session."""
    return {pid for pid in _pids() if pid != os.getpid() and _sid(pid) == sid and not _is_zombie(pid)}


class FakeAutoscalingCluster:
    """A CPU-less head (by default) and worker node types that the autoscaler starts from zero."""

    def __init__(self, worker_node_types: dict, *, folder: Path, head_resources: Optional[dict] = None,
                 idle_timeout_minutes: float = 0.1, max_workers: int = 8):
        self.folder = Path(folder)
        self.port, self.dashboard_port = free_port(), free_port()
        self.ip = _node_ip()
        self.address = f"{self.ip}:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        head = {"CPU": 0, "GPU": 0, **(head_resources or {})}
        config = copy.deepcopy(FAKE_BASE)
        config["available_node_types"] = copy.deepcopy(worker_node_types)
        config["available_node_types"][HEAD_TYPE] = {"resources": head, "node_config": {}, "max_workers": 0}
        # The provider starts each worker node's raylet against this GCS (else the default port 6379).
        config["provider"]["gcs_address"] = self.address
        config.update(idle_timeout_minutes=idle_timeout_minutes, max_workers=max_workers)
        self.config = config
        self.config_file = self.folder / "autoscaler.json"
        self.log = self.folder / "ray-start.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 180) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self.config))
        head = self.config["available_node_types"][HEAD_TYPE]["resources"]
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self.proc = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={head['CPU']:g}",
             f"--num-gpus={head['GPU']:g}", f"--autoscaling-config={self.config_file}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             "--disable-usage-stats"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip() if os.environ.get("RAY_AUTH_TOKEN_PATH") else ""
        while True:
            try:
                request = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                                 headers={"Authorization": f"Bearer {token}"} if token else {})
                with urllib.request.urlopen(request, timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the fake autoscaling cluster did not come up:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.5)

    def own_pids(self) -> set[int]:
        """Every live process of this cluster: its process group and session (session_members), and whatever
        names its GCS address (the worker nodes the autoscaler starts, their workers and agents)."""
        if self.proc is None:
            return set()
        mine = set()
        for pid in _pids():
            if pid == os.getpid() or _is_zombie(pid):
                continue
            if (_pgid(pid) == self.proc.pid or _sid(pid) == self.proc.pid
                    or f":{self.port}" in _cmdline(pid) and self.ip in _cmdline(pid)):
                mine.add(pid)
        return mine

    def stop(self) -> None:
        """Stop exactly this cluster's processes (never `ray stop`); remove its address record."""
        if self.proc is None:
            return
        targets = self.own_pids()
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):  # Ray takes >10 s to stop politely
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()
                targets = {p for p in targets | self.own_pids() if not _is_zombie(p)}
                if not targets:
                    break
                time.sleep(0.2)
            if not targets:
                break
            self.survivors = {p: _cmdline(p)[:200] for p in targets}
        self.proc.poll()
        from raydist.ray_edge.session import address_file

        try:
            if open(address_file()).read().strip().endswith(f":{self.port}"):
                os.remove(address_file())
        except OSError:
            pass

    def worker_nodes(self) -> list[dict]:
        """Alive worker nodes (ray.nodes() entries) of the connected cluster."""
        import ray

        return [n for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] and n["Resources"].get("CPU", 0) > 0]


def shutdown_cluster(cluster) -> None:
    """Stop a ray.cluster_utils.Cluster (its nodes' processes, by the pids it started) and remove this
    machine's latest-cluster record when it names that cluster, so that the next bare ray.init() does not
    try to join a cluster that is gone."""
    from raydist.ray_edge.session import address_file

    cluster.shutdown()
    try:
        if open(address_file()).read().strip() == cluster.address:
            os.remove(address_file())
    except OSError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class ConsoleLines:
    """A process's merged stdout and stderr, read line by line in a thread, each line with the seconds since
    this object was made (what a test or benchmark waits on, and when each line came)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.t0 = proc, [], time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line))

    def finish(self, timeout: float = 30) -> str:
        """Every line, once the process has ended and its output is read to the end."""
        self.reader.join(timeout)
        return self.text()

    def text(self) -> str:
        return "".join(line for _, line in list(self.lines))

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first line matching `pattern` (a regex), waiting up to `timeout` seconds while the process runs."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.proc.poll() is not None
            if ended:
                self.reader.join(5)  # its last lines read
            for _, line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            if ended or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.text()[-5000:]}")
