"""Screenshots of the Ray dashboard while a real raydist study runs, for the README.

    .venv/bin/python docs/dashboard_screenshot.py          # from the repository root; ~2-4 minutes

What it does, and why each step is there:

1. Starts its own local Ray cluster (`ray start --head --block`, free ports from raydist.ray_edge.session.free_port,
   2 CPUs, dashboard on 127.0.0.1) with RAY_AUTH_MODE=disabled, so headless Chromium needs no token, and
   RAY_TRAIN_ENABLE_STATE_TRACKING=1, which the dashboard's Train state needs.
2. Starts the default study against it in the background:
   `python -m raydist.tune --address 127.0.0.1:<gcs port> --storage-path <tmp> --name dashboard-demo`
   (8 small trials on the embedded digits data: about 90 s on 2 idle cores, longer on a busy machine).
3. Once trials have reported epochs (40-60 s in), takes headless-Chromium screenshots and writes
       docs/dashboard_overview.png   #/overview: the study's job among "Recent jobs", CPU use
       docs/dashboard_jobs.png       #/jobs: the study's driver job, RUNNING
       docs/dashboard_actors.png     #/actors: the running Tune trials (ImplicitFunc actors, run_trial)
       docs/dashboard_train.png      the Train view, only if the installed dashboard build has one; Ray
                                     2.60's has none (no route, no "Train" tab): the script says so and
                                     prints what the Train API, /api/train/v2/runs/v1, answers
       docs/dashboard_metrics.png    #/metrics, only if Grafana is set up (/api/grafana_health); without
                                     it the page is only Ray's "Set up Prometheus and Grafana" banner
4. Fetches the node's Prometheus endpoint (Ray's metrics agent) and prints the ray_raydist_* lines, the
   per-epoch gauges raydist exports (val_acc, epoch, ... labelled run/study/trial).
5. Waits for the study, then stops the cluster by the process group of its `ray start --block` process
   (never by process name) and removes /tmp/ray/ray_current_cluster only if it names this cluster.

Needs `chromium` on PATH (Debian: `apt-get install -y chromium`). Everything else it makes (cluster.log,
study.log, the study's folder, Chromium's profile) goes to a fresh /tmp/raydist-dashboard-* folder.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
VENV_BIN = Path(sys.executable).parent  # the venv this script runs in: its `ray` and `python`
STUDY_NAME = "dashboard-demo"

sys.path.insert(0, str(REPO))  # run as a plain file: make `raydist` importable without installing it
from raydist.ray_edge.session import address_file, free_port  # noqa: E402

# Both the cluster and every driver get these: with auth disabled the dashboard's HTTP API (and so the
# headless browser) works without a token; state tracking makes Ray Train record its runs in the GCS.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}

# One shared set of Chromium flags. --virtual-time-budget lets the dashboard's React code fetch its data
# and render before the shot is taken (virtual time: it does not simply wait 15 s of wall clock).
CHROMIUM = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1400,900", "--virtual-time-budget=15000"]

MAX_PNG_BYTES = 400_000  # README images: keep each small


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    """Poll `check()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # not up yet: connection refused, file missing, ...
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- the cluster ----------------------------------------------------------------------------------------


def start_cluster(gcs_port: int, dashboard_port: int, log_file) -> subprocess.Popen:
    """`ray start --head --block` in a new session: its pid is then the process group of everything it
    starts (GCS, raylet, dashboard, workers), so the cluster can be stopped without matching names."""
    cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           "--disable-usage-stats", "--block"]
    log("starting cluster: " + " ".join(cmd[1:]))
    return subprocess.Popen(cmd, env={**os.environ, **RAY_ENV}, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`, from /proc: by group, never by name."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:
            continue  # exited meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            pids.append(int(stat.split("/")[2]))
    return pids


def stop_cluster(head: subprocess.Popen, gcs_port: int) -> None:
    """Stop the cluster by the process group of its `ray start --block` process, then forget it in the
    address file if that still names it.

    SIGTERM goes to the head process first, alone: it then drains the node through the GCS and stops the
    processes it started. SIGTERM to the whole group at once would kill the GCS too, and the head would
    wait 30 s for a GCS that is gone ("Failed to mark the local node as draining"). Then SIGTERM, and last
    SIGKILL, to whatever is left of the group (start_new_session=True: the head's pid is the group id)."""
    pgid = head.pid
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=45)
    except subprocess.TimeoutExpired:
        log("ray start did not exit 45 s after SIGTERM")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = group_members(pgid)
        if not left:
            break
        log(f"{signal.Signals(sig).name} to what is left of process group {pgid}: pids {left}")
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
    if head.poll() is None:
        head.wait(timeout=10)
    left = group_members(pgid)
    log(f"cluster stopped: {'pids ' + str(left) + ' still' if left else 'no process'} left in process group {pgid}")

    # `ray start` wrote this cluster's address into the file that `--address auto` reads; remove it only
    # if it still names this cluster (another cluster may have been started since).
    path = address_file()
    try:
        content = Path(path).read_text().strip()
    except OSError:
        return
    if content.endswith(f":{gcs_port}"):
        os.remove(path)
        log(f"removed {path} ({content})")
    else:
        log(f"left {path} alone: it names {content!r}, not this cluster")


# ---- the study ------------------------------------------------------------------------------------------


def start_study(gcs_port: int, storage: str, log_file) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "python"), "-m", "raydist.tune", "--address", f"127.0.0.1:{gcs_port}",
           "--storage-path", storage, "--name", STUDY_NAME]
    log("starting study: " + " ".join(cmd[1:]))
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **RAY_ENV}, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)


def epochs_reported(storage: str) -> int:
    """Lines in all trials' history.jsonl (raydist.ray_edge.history): how many epochs trials have reported."""
    files = glob.glob(os.path.join(storage, STUDY_NAME, "**", "history.jsonl"), recursive=True)
    return sum(len(Path(f).read_text().splitlines()) for f in files)


# ---- the dashboard --------------------------------------------------------------------------------------


def train_route() -> str | None:
    """The Train view's route in the installed dashboard build, or None if it has none. The route table is
    compiled into the React bundle as `path:"..."` entries; look for one that mentions train."""
    import ray

    build = Path(ray.__file__).parent / "dashboard" / "client" / "build" / "static" / "js"
    for js in sorted(build.glob("*.js")):
        for path in re.findall(r'path:"([^"]*)"', js.read_text(errors="replace")):
            if "train" in path.lower():
                return "/" + path.strip("/")
    return None


def grafana_set_up(dashboard: str) -> bool:
    """What the dashboard itself asks before it draws charts: /api/grafana_health answers 200 only when
    Grafana (and, through it, Prometheus) is reachable."""
    try:
        http_get(f"{dashboard}/api/grafana_health")
        return True
    except urllib.error.HTTPError:
        return False


def train_runs(dashboard: str) -> str:
    """How many Train runs the Train API lists, or its error text: it answers 500 until some run has
    started Ray Train's state actor (the default study trains one-worker trials in process, so none)."""
    try:
        runs = json.loads(http_get(f"{dashboard}/api/train/v2/runs/v1")).get("train_runs", [])
        return f"{len(runs)} Train run(s)"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}: {error.read().decode(errors='replace').strip()}"


def screenshot(url: str, out: Path, profile: str) -> None:
    # A fresh --user-data-dir keeps Chromium off any profile (and its lock) another Chromium uses.
    subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", f"--screenshot={out}", url],
                   check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    size = out.stat().st_size
    note = "" if size <= MAX_PNG_BYTES else f"  (over {MAX_PNG_BYTES // 1000} KB: retake at a smaller window)"
    log(f"wrote {out.relative_to(REPO)} ({size // 1000} KB) from {url}{note}")


def print_raydist_metrics(gcs_port: int) -> None:
    """Join the cluster as a driver only to find the node's metrics-export port, then read Ray's
    Prometheus text there and print raydist's gauges."""
    import ray

    ray.init(address=f"127.0.0.1:{gcs_port}", logging_level="ERROR", log_to_driver=False)
    try:
        node = ray.nodes()[0]
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    finally:
        ray.shutdown()
    text = http_get(url, timeout=10).decode()
    lines = [line for line in text.splitlines() if line.startswith("ray_raydist_")]
    log(f"{len(lines)} ray_raydist_ lines at {url}; the first, whole:")
    if lines:
        print("    " + lines[0])
    # Ray adds its own labels (Component, NodeAddress, SessionName, WorkerId, otel_*): print each line with
    # raydist's labels only, to keep them readable.
    log("all of them, with raydist's labels (run, study, trial) only:")
    for line in lines:
        name, labels, value = re.match(r"(\w+)\{(.*)\}\s+(\S+)$", line).groups()
        ours = ",".join(f'{key}="{val}"' for key, val in re.findall(r'(\w+)="([^"]*)"', labels)
                        if key in ("run", "study", "trial"))
        print(f"    {name}{{{ours}}} {value}")


# ---- main -----------------------------------------------------------------------------------------------


def main() -> int:
    t0 = time.monotonic()
    gcs_port, dashboard_port = free_port(), free_port()
    while dashboard_port == gcs_port:
        dashboard_port = free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    os.environ.update(RAY_ENV)  # this script's own ray.init needs no token either

    work = tempfile.mkdtemp(prefix="raydist-dashboard-")
    storage = os.path.join(work, "runs")
    cluster_log = open(os.path.join(work, "cluster.log"), "w")
    study_log_path = os.path.join(work, "study.log")
    study_log = open(study_log_path, "w")
    log(f"working folder {work} (cluster.log, study.log, runs/)")

    head = start_cluster(gcs_port, dashboard_port, cluster_log)
    study, rc = None, 1
    try:
        wait_for("the dashboard", lambda: http_get(f"{dashboard}/api/version"), timeout=120)
        log(f"dashboard up at {dashboard}")

        study = start_study(gcs_port, storage, study_log)
        started = time.monotonic()
        # Shots are worth taking once trials have reported epochs and both CPUs are busy with trials: at
        # least 40 s in and 4 epochs reported (at most 60 s), with the study's ~90 s still well under way.
        while study.poll() is None and time.monotonic() < started + 60 and (
                time.monotonic() < started + 40 or epochs_reported(storage) < 4):
            time.sleep(2)
        log(f"{time.monotonic() - started:.0f} s into the study, {epochs_reported(storage)} epochs reported")
        if study.poll() is not None:
            raise RuntimeError(f"the study exited early (rc {study.returncode}); see {study_log_path}")

        profile = os.path.join(work, "chromium-profile")
        # Actors: the running Tune trials (ImplicitFunc actors, repr run_trial) of the study's job. (A job's
        # own page, #/jobs/<id>, adds only task counts and "Driver logs are only available when submitting
        # jobs via the Job Submission API" for a driver started from a shell, so it is left out.)
        pages = [("overview", "/overview"), ("jobs", "/jobs"), ("actors", "/actors")]
        route = train_route()
        if route:
            pages.append(("train", route))
        if grafana_set_up(dashboard):
            pages.append(("metrics", "/metrics"))
        else:
            # Without Grafana and Prometheus the Metrics page is only Ray's "Set up Prometheus and Grafana"
            # banner: not worth a picture. raydist's gauges are still served (printed below).
            log("Grafana/Prometheus not set up: no dashboard_metrics.png (the page would be only Ray's banner)")
        for name, route_path in pages:
            screenshot(f"{dashboard}/#{route_path}", DOCS / f"dashboard_{name}.png", profile)
        if not route:
            # Ray 2.60's open-source dashboard serves Train state over HTTP but has no page for it.
            log("no Train view in this dashboard build (no route mentions 'train'): no dashboard_train.png; "
                f"its Train API says: {train_runs(dashboard)}")
        log(f"{time.monotonic() - started:.0f} s into the study, {epochs_reported(storage)} epochs reported")

        print_raydist_metrics(gcs_port)

        log("waiting for the study to finish")
        rc = study.wait(timeout=600)
        log(f"study exited with {rc} after {time.monotonic() - started:.0f} s; last lines of study.log:")
        study_log.flush()
        for line in Path(study_log_path).read_text().splitlines()[-12:]:
            print("    " + line)
    finally:
        if study is not None and study.poll() is None:  # interrupted or failed: don't leave the driver
            os.killpg(study.pid, signal.SIGTERM)
            study.wait(timeout=30)
        stop_cluster(head, gcs_port)
        cluster_log.close()
        study_log.close()
    log(f"done in {time.monotonic() - t0:.0f} s")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
