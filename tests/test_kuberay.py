"""The KubeRay sample (raycluster.yaml): valid against KubeRay's published RayCluster schema (a copy in
tests/data, with where it came from), the same cluster as cluster.yaml, and what raydist plans from it when
it runs in one of its pods: the node types KubeRay's autoscaler derives from the resource (Ray's own code
for it), and an unknown limit, not a refusal, where the pod may not read the resource.
"""

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from raydist.ray_edge import autoscaler, planning

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(__file__).parent / "data" / "kuberay_raycluster_v1_schema.json").read_text())


def _sample() -> dict:
    return yaml.safe_load((ROOT / "raycluster.yaml").read_text())


def test_the_schema_copy_says_where_it_came_from():
    assert SCHEMA["source"].startswith("https://github.com/ray-project/kuberay/blob/v1.7.0/")
    assert SCHEMA["schema"]["properties"]["spec"]["properties"]["workerGroupSpecs"]["type"] == "array"


def test_the_sample_is_a_valid_raycluster_and_the_schema_catches_a_broken_one():
    sample = _sample()
    jsonschema.validate(sample, SCHEMA["schema"])
    broken = _sample()
    broken["spec"]["authOptions"]["mode"] = "password"  # not one of KubeRay's modes
    with pytest.raises(jsonschema.ValidationError, match="'password' is not one of"):
        jsonschema.validate(broken, SCHEMA["schema"])
    broken = _sample()
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="'groupName' is a required property"):
        jsonschema.validate(broken, SCHEMA["schema"])


def test_the_sample_is_the_same_cluster_as_cluster_yaml():
    import ray

    sample, launcher = _sample(), yaml.safe_load((ROOT / "cluster.yaml").read_text())
    spec = sample["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token" and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head never trains
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        group["template"]["spec"]["containers"][0] for group in spec["workerGroupSpecs"]]
    start = " ".join(launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"])
    for container in containers:
        assert container["image"] == launcher["docker"]["image"]
        for variable in container["env"]:  # the environment cluster.yaml's start commands export
            assert f"{variable['name']}={variable['value']}" in start
    assert {v["name"] for v in containers[0]["env"]} == {"RAY_TRAIN_ENABLE_STATE_TRACKING",
                                                         "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == launcher["idle_timeout_minutes"] * 60
    gpu = spec["workerGroupSpecs"][0]
    assert (gpu["minReplicas"], gpu["replicas"]) == (0, 0)  # started from zero, as cluster.yaml's GPU types


def test_what_the_sample_can_grow_to_through_kuberays_own_reading():
    config = autoscaler.raycluster_autoscaling_config(_sample())
    types = planning.node_types(config)
    assert {t.name: (t.resources.get("CPU"), t.resources.get("GPU"), t.max_count) for t in types} == {
        "headgroup": (0.0, None, 1), "gpu": (44.0, 4.0, 4)}
    limit = planning.grow_to(types, config["max_workers"])
    assert (limit["CPU"], limit["GPU"]) == (176.0, 16.0)
    assert planning.max_worker_nodes(types, config["max_workers"]) == 4


def test_a_pod_of_a_raycluster_is_found_and_without_access_its_limit_stays_unknown(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_CLUSTER_NAME", raising=False)
    monkeypatch.setattr(autoscaler, "SERVICE_ACCOUNT", str(tmp_path))
    assert autoscaler.kuberay_cluster() is None
    assert autoscaler.kuberay_autoscaling_config() == autoscaler.KubeRayReading(None, None, "not in a KubeRay pod")
    (tmp_path / "namespace").write_text("ml\n")
    monkeypatch.setenv("RAY_CLUSTER_NAME", "raydist")
    assert autoscaler.kuberay_cluster() == ("raydist", "ml")
    # No service-account token here (as in a pod whose account may not read RayClusters, or with no API):
    # Ray's Kubernetes client fails, and the limit is unknown rather than what the cluster has now.
    from ray.autoscaler._private.kuberay import node_provider

    monkeypatch.setattr(node_provider, "IN_CLUSTER_TOKEN_PATH", str(tmp_path / "token"))  # none there
    reading = autoscaler.kuberay_autoscaling_config()
    assert (reading.config, reading.autoscales) == (None, None)  # unknown: capacity() goes on to the autoscaler
    assert reading.why.startswith("RayCluster ml/raydist could not be read (FileNotFoundError: ")
    assert "\n" not in reading.why


# ---- the read from the Kubernetes API, against a local HTTPS server that serves the sample --------------------

READ_IN_A_POD = """
import json, sys
from ray.autoscaler._private.kuberay import node_provider
from raydist.ray_edge import autoscaler, planning

autoscaler.SERVICE_ACCOUNT = sys.argv[1]  # the pod's /var/run/secrets/kubernetes.io/serviceaccount
node_provider.IN_CLUSTER_TOKEN_PATH = sys.argv[1] + "/token"
reading = autoscaler.kuberay_autoscaling_config()
config = reading.config
limit = planning.grow_to(planning.node_types(config), config["max_workers"]) if config else None
print(json.dumps({"why": reading.why, "autoscales": reading.autoscales, "grow_to": limit}))
"""


def _self_signed(folder):
    """A certificate for 127.0.0.1 and its key, as the API server's (the pod trusts it through the CA path)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "ca.crt", folder / "tls.key"


@pytest.fixture
def kubernetes_api(tmp_path, request):
    """An HTTPS server that answers GET of the sample RayCluster in namespace ml (with enableInTreeAutoscaling
    as the test's `autoscales` parameter) to the token 'pod-token' and 403 (as RBAC does) to any other;
    yields (port, requests seen, its certificate)."""
    import http.server
    import ssl
    import threading

    cert, key = _self_signed(tmp_path)
    seen = []
    resource = {**_sample(), "metadata": {"name": "raydist", "namespace": "ml"}}
    resource["spec"]["enableInTreeAutoscaling"] = request.getfixturevalue("autoscales")

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            ok = (self.path == "/apis/ray.io/v1/namespaces/ml/rayclusters/raydist"
                  and self.headers.get("Authorization") == "Bearer pod-token")
            body = json.dumps(resource if ok else {"kind": "Status", "code": 403}).encode()
            self.send_response(200 if ok else 403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Api)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen, cert
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("token, autoscales, expected", [("pod-token", True, "read"), ("pod-token", False, "fixed"),
                                                         ("another-token", True, "forbidden")])
def test_in_a_pod_the_raycluster_is_read_from_the_kubernetes_api(kubernetes_api, tmp_path, token, autoscales,
                                                                  expected):
    import subprocess
    import sys

    port, seen, cert = kubernetes_api
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "namespace").write_text("ml")
    (account / "token").write_text(token)
    env = {**os.environ, "RAY_CLUSTER_NAME": "raydist", "KUBERNETES_SERVICE_HOST": "127.0.0.1",
           "KUBERNETES_SERVICE_PORT_HTTPS": str(port), "RAY_KUBERAY_CA_CERT_PATH": str(cert)}
    result = subprocess.run([sys.executable, "-c", READ_IN_A_POD, str(account)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == [("/apis/ray.io/v1/namespaces/ml/rayclusters/raydist", f"Bearer {token}")]
    if expected == "read":  # KubeRay's head account may read its RayCluster: the limit is known
        assert answer["why"] == "" and answer["autoscales"] is True
        assert (answer["grow_to"]["CPU"], answer["grow_to"]["GPU"]) == (176.0, 16.0)
    elif expected == "fixed":  # no in-tree autoscaling: a fixed cluster, whatever its head's monitor reports
        assert answer == {"why": "RayCluster ml/raydist does not autoscale", "autoscales": False, "grow_to": None}
    else:  # an account RBAC does not allow: unknown (the next kind in capacity()), said in one line
        assert answer["grow_to"] is None and answer["autoscales"] is None
        assert answer["why"].startswith("RayCluster ml/raydist could not be read (HTTPError: 403 Client Error")
