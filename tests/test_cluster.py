"""The cluster side: cluster files checked with Ray's own schema (and for instance profiles on every node
type, a pinned image and torch, the node types published at start); a job submitted to the session's head
node (started with `ray start --head`, token auth on) through Ray's job API, its logs read back through
the dashboard's REST API, its Train run listed; a submission without the token refused."""

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cli import without_ray_lines
import yaml

from raydist.ray_edge.cluster_file import validate_cluster_file
from raydist.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILES = [ROOT / "cluster.yaml", ROOT / "cluster-local.yaml"]


# ---- cluster files, offline ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_files_pass_rays_schema_and_keep_the_cluster_private(path):
    config = validate_cluster_file(str(path))
    raw = yaml.safe_load(path.read_text())
    start = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in start if "ray start" in c)  # token auth on every node
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])  # never public
    assert any("RAY_TRAIN_ENABLE_STATE_TRACKING=1" in c for c in raw["head_start_ray_commands"])
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token, every node
    assert any("pip install" in c and "raydist" in c for c in raw["setup_commands"])
    assert config["head_node_type"] in config["available_node_types"]


def test_the_cloud_cluster_is_gpu_autoscaling_on_the_current_ray_image():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"  # not the retired ray-ml images
    workers = {name: t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]}
    gpu_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert gpu_types & {"g5.12xlarge", "p5.48xlarge"} and all(t["min_workers"] == 0 for t in workers.values())
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in workers.values())


def test_every_node_type_has_an_instance_profile_and_the_pinned_image():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = raw["available_node_types"]
    for name, node_type in types.items():  # Ray gives its default S3 role to the head only
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    workers = [t for n, t in types.items() if n != raw["head_node_type"]]
    assert {t["node_config"]["IamInstanceProfile"]["Arn"] for t in workers} == {
        "arn:aws:iam::ACCOUNT_ID:instance-profile/raydist-node"}  # bucket access only, not the head's EC2 rights
    images = {t["node_config"]["ImageId"] for t in types.values()}
    assert len(images) == 1 and images.pop().startswith("ami-")  # one pinned id, never Ray's latest_dlami
    text = (ROOT / "cluster.yaml").read_text()
    assert "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)" in text and "aws ec2 describe-images" in text
    for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:ListBucket", "iam:PassRole"):
        assert action in text


def test_torch_is_pinned_and_installed_only_when_the_image_lacks_it_and_the_node_types_are_published():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    torch_setup = next(c for c in raw["setup_commands"] if "torch" in c)
    assert "pip install --quiet torch==2.15.0 torchvision==0.29.2" in torch_setup
    assert torch_setup.index("||") < torch_setup.index("pip install")  # skipped when the image has it
    start = raw["head_start_ray_commands"][-1]
    assert start.index("ray start --head") < start.index(
        "&& python -m raydist.cluster publish ~/ray_bootstrap_config.yaml")


# What `ray up` fills into `resources: {}` from EC2 for each instance type of cluster.yaml (vCPUs, GPUs).
EC2 = {"g5.12xlarge": {"CPU": 48, "GPU": 4}, "p5.48xlarge": {"CPU": 192, "GPU": 8}}


def test_the_cloud_cluster_can_grow_to_a_32_gpu_run_on_four_h100_nodes():
    from raydist.ray_edge.planning import check_resources, grow_to, node_types

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for node_type in raw["available_node_types"].values():
        node_type["resources"] = node_type["resources"] or EC2[node_type["node_config"]["InstanceType"]]
    types = node_types(raw)
    h100 = [t for t in types if t.name == "gpu_h100"]
    assert (h100[0].max_count, h100[0].resources["GPU"]) == (4, 8)  # 32 H100s
    most = grow_to(types, raw["max_workers"])
    assert most["GPU"] == 4 * 8 + 5 * 4  # the H100 nodes and the five A10G nodes at once
    assert check_resources(cluster_cpus=most["CPU"], cluster_gpus=most["GPU"], use_gpu=None, num_workers=32,
                           cpus_per_worker=4, gpus_per_worker=1, where="the cluster at its largest")
    with pytest.raises(ConfigError, match="asks for 53 GPUs but the cluster at its largest has 52"):
        check_resources(cluster_cpus=most["CPU"], cluster_gpus=most["GPU"], use_gpu=True, num_workers=53,
                        cpus_per_worker=1, gpus_per_worker=1, where="the cluster at its largest")


def test_the_h100_nodes_reach_each_other_over_efa_and_every_gpu_node_checks_its_gpu():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    h100 = raw["available_node_types"]["gpu_h100"]
    interfaces = h100["node_config"]["NetworkInterfaces"]
    assert [i["NetworkCardIndex"] for i in interfaces] == list(range(32))  # every network card of a p5
    assert {i["InterfaceType"] for i in interfaces} == {"efa", "efa-only"} and interfaces[0]["InterfaceType"] == "efa"
    assert all(i["SubnetId"] and i["Groups"] for i in interfaces) and h100["node_config"]["Placement"]["GroupName"]
    options = " ".join(h100["docker"]["worker_run_options"])
    for needed in ("--device=/dev/infiniband", "memlock=-1:-1", "/opt/amazon", "FI_PROVIDER=efa"):
        assert needed in options, needed
    # Ray sizes /dev/shm (and so the object store) to each node's memory unless a size is given.
    everywhere = raw["docker"]["run_options"] + [o for t in raw["available_node_types"].values()
                                                 for o in t.get("docker", {}).get("worker_run_options", [])]
    assert not [o for o in everywhere if "--shm-size" in o]
    (check,) = raw["worker_setup_commands"]
    assert "torch.cuda.is_available() or sys.exit(" in check
    result = subprocess.run([sys.executable, "-c", check.split('"')[1]], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # a node whose GPU torch cannot use
    assert result.returncode == 1 and result.stderr.startswith("no usable GPU on this node: torch ")


def test_publish_refuses_node_types_whose_resources_nobody_filled_in():
    from raydist.ray_edge.planning import publish_cluster_config

    config = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())  # the local provider fills in nothing
    config["available_node_types"] = {"local.cluster.node": {"resources": {}, "node_config": {}, "min_workers": 2,
                                                             "max_workers": 2}}
    config["head_node_type"] = "local.cluster.node"
    with pytest.raises(ConfigError, match=r"^node type local.cluster.node lists no resources .*nothing published$"):
        publish_cluster_config(config, "127.0.0.1:1")


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c.update(max_wrokers=3), "'max_wrokers' was unexpected"),
    (lambda c: c.update(head_node_type="gpu_node"), "`head_node_type` must be one of `available_node_types`"),
    (lambda c: c["available_node_types"]["head"].update(node_confg={}), "'node_confg' was unexpected"),
    (lambda c: c["provider"].pop("type"), "type"),
])
def test_schema_validation_rejects_a_broken_copy(tmp_path, break_it, message):
    config = copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    break_it(config)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as excinfo:
        validate_cluster_file(str(broken))
    assert str(broken) in str(excinfo.value) and message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_validate_command_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "raydist.cluster", "validate", *map(str, CLUSTER_FILES)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "cluster.yaml: valid (aws provider" in ok.stdout
    (tmp_path / "bad.yaml").write_text("cluster_name: x\nprovider: {type: aws, region: us-west-2}\nbogus: 1\n")
    bad = subprocess.run([sys.executable, "-m", "raydist.cluster", "validate", str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("raydist.cluster: error: ") and "bogus" in bad.stderr


CLUSTER_FILE_NEEDS = "a Ray cluster file is a YAML mapping with at least cluster_name and provider (with its type)"
PROBLEM_FILES = {  # what each says, in one line naming the file and the key
    "empty.yaml": ("", f"the file is empty; {CLUSTER_FILE_NEEDS}"),
    "braces.yaml": ("{}\n", "cluster_name, provider missing"),
    "list.yaml": ("- cluster_name: x\n", f"the file holds a list, not a mapping of keys; {CLUSTER_FILE_NEEDS}"),
    "invalid.yaml": ("cluster_name: [x,\n", "not valid YAML: expected the node content, but found '<stream end>' "
                                            "at line 2, column 1"),
    "no-provider.yaml": ("cluster_name: x\n", "provider missing"),
    "no-type.yaml": ("cluster_name: x\nprovider: {region: us-west-2}\n", "provider.type missing"),
    "provider-string.yaml": ("cluster_name: x\nprovider: aws\n", "provider must be a mapping, not a string ('aws')"),
    "node-type.yaml": ("cluster_name: x\nprovider: {type: aws, region: us-west-2}\nhead_node_type: head\n"
                       "available_node_types: {head: 4}\n",
                       "available_node_types.head must be a mapping, not an integer (4)"),
    # Named as written, not as worker_setup_commands (where Ray copies setup_commands before its check).
    "command.yaml": ("cluster_name: x\nprovider: {type: aws, region: us-west-2}\nsetup_commands: [ls, {a: b}]\n",
                     "setup_commands[1] must be a string, not a mapping ({'a': 'b'})"),
}


def test_validate_checks_every_file_and_says_each_problem_in_one_line_naming_the_file_and_key(tmp_path):
    for name, (text, _) in PROBLEM_FILES.items():
        (tmp_path / name).write_text(text)
    files = [str(CLUSTER_FILES[0]), *PROBLEM_FILES, str(CLUSTER_FILES[1])]
    result = subprocess.run([sys.executable, "-m", "raydist.cluster", "validate", *files],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"raydist.cluster: error: {name}: {message}"
                                          for name, (_, message) in PROBLEM_FILES.items()]
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == list(map(str, CLUSTER_FILES))


# ---- a real head node: job submission, dashboard REST, token auth ------------------------------------------


def _request(cluster, method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{cluster.dashboard_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture(scope="module")
def submitted_job(cluster, ray_cluster, tmp_path_factory):
    """`python -m raydist.train` on digits, submitted like `ray job submit`: 2 workers, 6 epochs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    runs = tmp_path_factory.mktemp("job-runs")
    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers())
    entrypoint = (f"{sys.executable} -m raydist.train --address auto --num-workers 2 --batch-size 32 --lr 3.0 "
                  f"--epochs 6 --warmup-epochs 0.5 --storage-path {runs} --name job-run")
    # Ray's job agent on the head can come up after the dashboard: its 500 says to try again later (seen
    # once on a loaded 2-core VM, 2026-12-07); at most a minute of that, then the error stands.
    agent_deadline = time.monotonic() + 60
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > agent_deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-5000:]
    return job_id, entrypoint


def test_a_submitted_training_job_succeeds_and_its_logs_show_every_epoch(cluster, submitted_job):
    import re

    job_id, _ = submitted_job
    logs = _request(cluster, "GET", f"/api/jobs/{job_id}/logs", headers=cluster.headers())["logs"]
    epochs = [int(e) for e in re.findall(r"epoch +(\d+)/6 ", logs)]
    assert epochs == [1, 2, 3, 4, 5, 6]  # rank 0's line per epoch, once
    final = re.search(r"finished 6 epoch\(s\) in [\d.]+s: val acc ([\d.]+)%", logs)
    assert final and float(final.group(1)) >= 90.0  # it learned


def test_the_train_run_is_listed_by_the_dashboard_with_its_final_status(cluster, submitted_job):
    job_id, _ = submitted_job
    deadline = time.monotonic() + 60  # the state actor records the end of a run asynchronously
    while True:
        runs = _request(cluster, "GET", "/api/train/v2/runs/v1", headers=cluster.headers())["train_runs"]
        run = next((r for r in runs if r["name"] == "job-run"), None)
        if (run and run["status"] == "FINISHED") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert run is not None, [r["name"] for r in runs]
    assert run["status"] == "FINISHED"
    jobs = _request(cluster, "GET", "/api/jobs/", headers=cluster.headers())
    assert run["job_id"] in {j["job_id"] for j in jobs if j.get("submission_id") == job_id}


@pytest.mark.parametrize("headers, code", [({}, 401), ({"Authorization": "Bearer not-the-token"}, 403)])
def test_a_submission_without_the_token_is_refused_and_nothing_runs(cluster, ray_cluster, tmp_path, headers, code):
    marker = tmp_path / "ran"
    entrypoint = f"{sys.executable} -c \"open('{marker}', 'w')\""
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        _request(cluster, "POST", "/api/jobs/", {"entrypoint": entrypoint}, headers=headers)
    assert excinfo.value.code == code
    time.sleep(3)
    jobs = _request(cluster, "GET", "/api/jobs/", headers=cluster.headers())
    assert entrypoint not in {j["entrypoint"] for j in jobs} and not marker.exists()


def test_status_command_shows_resources_jobs_train_runs_and_the_dashboard(cluster, submitted_job):
    job_id, entrypoint = submitted_job
    result = subprocess.run([sys.executable, "-m", "raydist.cluster", "status", "--address", cluster.address],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "1 node(s), CPU 2 free of 2, GPU 0 free of 0" in out
    assert "can grow to: no more (from current resources (no autoscaler reports to the cluster))" in out
    assert "nodes starting: none" in out
    assert f"dashboard: {cluster.dashboard_url}" in out and f"(token: {cluster.token_file})" in out
    assert f"{job_id}  SUCCEEDED  {entrypoint}" in out
    assert any(line.split()[:2] == ["job-run", "FINISHED"] for line in out.splitlines())


# ---- a stale or wrong address: one line at once, never minutes of GCS retries ----------------------------


def _stale_ray_tmpdir():
    """A Ray temp folder of this test's own whose address file names a cluster that is gone (what a
    cluster stopped by signals leaves behind). Short path: Ray puts unix sockets under it."""
    import socket
    import tempfile

    folder = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket closes
    os.makedirs(os.path.join(folder, "ray"))
    with open(os.path.join(folder, "ray", "ray_current_cluster"), "w") as fh:
        fh.write(dead)
    return folder, dead


ADDRESS_HELP = "expected the head node's host:port (e.g. 10.0.0.10:6379) of a running cluster, or "


COMMANDS = ["raydist.train", "raydist.tune", "raydist.cluster status"]
ADDRESS_KINDS = ["dead", "auto", "foreign"]


class _AddressCase:
    """A stale Ray temp folder (_stale_ray_tmpdir) and a port that accepts connections but says nothing;
    `address` is what --address gets, `line` what the command's last line must be."""

    def __init__(self, command: str, kind: str):
        import socket

        self.folder, dead = _stale_ray_tmpdir()
        self.foreign = socket.create_server(("127.0.0.1", 0))  # the kernel accepts connections; nobody answers
        if kind == "foreign":
            dead = f"127.0.0.1:{self.foreign.getsockname()[1]}"
            Path(self.folder, "ray", "ray_current_cluster").write_text(dead)
        self.address = dead if kind == "dead" else "auto"
        where = "" if kind == "dead" else f" (the last `ray start` here, from {self.folder}/ray/ray_current_cluster)"
        otherwise = "start one with `ray start --head`" if command.endswith("status") else \
            "drop --address to start a local one"
        problem = (f"something answers at {dead}{where} but it is not a Ray cluster (no gRPC server, which a head "
                   f"node's GCS port is)" if kind == "foreign" else f"no Ray cluster answers at {dead}{where}")
        self.line = f"{command.split()[0]}: error: --address {self.address}: {problem}; {ADDRESS_HELP}{otherwise}"

    def close(self):
        self.foreign.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ADDRESS_KINDS)
def test_an_address_nothing_answers_at_is_one_line(tmp_path, monkeypatch, command, kind):
    """Every command x every kind of address, through the check each command runs before ray.init
    (raydist.ray_edge.session.check_reachable; the real processes below prove the exit code). 'foreign': the address
    file names a port that something other than Ray now holds (it accepts and says nothing); ray.init waited
    on it for minutes."""
    from raydist.ray_edge.session import START_HEAD, START_LOCAL, check_reachable
    from raydist.errors import ConfigError

    case = _AddressCase(command, kind)
    try:
        monkeypatch.setenv("RAY_TMPDIR", case.folder)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        with pytest.raises(ConfigError) as refused:
            check_reachable(case.address, otherwise=START_HEAD if command.endswith("status") else START_LOCAL)
        assert f"{command.split()[0]}: error: {refused.value}" == case.line
    finally:
        case.close()


@pytest.mark.parametrize("command, kind", list(zip(COMMANDS, ADDRESS_KINDS)))
def test_an_address_nothing_answers_at_is_exit_2_and_one_line_from_the_process(tmp_path, command, kind):
    """The real process, each command once (with each kind of address once): exit code 2 in seconds,
    that last line, nothing written."""
    case = _AddressCase(command, kind)
    try:
        env = {**os.environ, "RAY_TMPDIR": case.folder}
        env.pop("RAY_ADDRESS", None)
        flags = [] if command.endswith("status") else ["--storage-path", str(tmp_path / "runs")]
        result = subprocess.run([sys.executable, "-m", *command.split(), "--address", case.address, *flags],
                                capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1] == case.line
        assert not list(tmp_path.iterdir())  # nothing written
    finally:
        case.close()


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "head-node", "", "local", "10.0.0.10:port"])
def test_status_refuses_an_address_that_is_not_one_in_one_line(capsys, address):
    from raydist.cluster import main

    assert main(["status", "--address", address]) == 2
    assert without_ray_lines(capsys.readouterr().err) == (
        f"raydist.cluster: error: --address {address}: {address!r} is not a cluster address; expected 'auto', the "
        f"head node's host:port (e.g. 10.0.0.10:6379) or ray://host:port\n")


def test_status_without_any_cluster_on_the_machine_says_how_to_start_one(tmp_path, monkeypatch, capsys):
    from raydist.cluster import main

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no ray/ray_current_cluster under it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["status"]) == 2
    assert without_ray_lines(capsys.readouterr().err) == (
        f"raydist.cluster: error: --address auto: no Ray cluster was started on this machine (no "
        f"{tmp_path}/ray/ray_current_cluster); give the head node's host:port, or start one with `ray start --head`\n")


@pytest.mark.parametrize("text, message", [
    ("", f"the file is empty; {CLUSTER_FILE_NEEDS}"),
    ("cluster_name: x\nprovider: {type: aws, region: us-west-2}\n",
     "available_node_types missing; publish tells the cluster its node types"),
    ("cluster_name: x\nprovider: {type: aws}\nmax_wrokers: 2\n",
     "Additional properties are not allowed ('max_wrokers' was unexpected)"),
])
def test_publish_refuses_a_file_without_node_types_before_it_connects(tmp_path, capsys, text, message):
    from raydist.cluster import main

    (tmp_path / "bootstrap.yaml").write_text(text)
    assert main(["publish", str(tmp_path / "bootstrap.yaml"), "--address", "127.0.0.1:1"]) == 2  # nothing there
    err = without_ray_lines(capsys.readouterr().err)
    assert err == f"raydist.cluster: error: {tmp_path / 'bootstrap.yaml'}: {message}\n"


@pytest.mark.own_cluster  # a local cluster, started by raydist.train itself
def test_a_bare_run_starts_its_own_cluster_whatever_a_stale_address_file_says(tmp_path):
    folder, dead = _stale_ray_tmpdir()
    try:
        env = {**os.environ, "RAY_TMPDIR": folder}
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run([sys.executable, "-m", "raydist.train", "--epochs", "2", "--num-workers", "1",
                                 "--storage-path", str(tmp_path / "runs"), "--name", "bare"],
                                capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "started a local Ray cluster; dashboard: http://127.0.0.1:" in result.stdout
        assert "finished 2 epoch(s)" in result.stdout
        assert dead not in result.stdout + result.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_local_cluster_never_grows_whatever_autoscaler_files_the_machine_holds(ray_cluster, tmp_path, monkeypatch):
    """A `ray up` head holds ~/ray_bootstrap_config.yaml; a cluster raydist started there itself is still
    only this machine (its Tune trials inherit the marker through the runtime environment)."""
    from raydist.ray_edge import session
    from raydist.ray_edge import planning

    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump({
        "head_node_type": "head", "max_workers": 4,
        "available_node_types": {"head": {"resources": {"CPU": 0}, "max_workers": 0},
                                 "gpu": {"resources": {"CPU": 8, "GPU": 4}, "min_workers": 0, "max_workers": 4}}}))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(session.LOCAL_CLUSTER_ENV, raising=False)
    assert (planning.capacity().max_gpus, planning.capacity().autoscaling) == (16, True)  # the file is read
    monkeypatch.setenv(session.LOCAL_CLUSTER_ENV, "1")
    cap = planning.capacity()
    assert (cap.max_cpus, cap.max_gpus, cap.autoscaling) == (2, 0, False)


def test_a_port_raydist_picks_for_ray_is_never_one_ray_takes_by_default(monkeypatch):
    """The kernel once handed out 52365, the dashboard agent's default: `ray start` then refused to start."""
    import socket

    from raydist.ray_edge import session

    offered = iter([52365, 8265, 41234])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket, "socket", FakeSocket)
    assert session.free_port() == 41234
