"""cluster/: launch files and job submission.

Fast: every ``ray up`` file passes Ray's own ``prepare_config`` + ``validate_config`` (the schema
``ray up`` checks before it calls a cloud), the KubeRay RayJob has its required fields, every file keeps
the security rules (dashboard on 127.0.0.1, token auth on, MLflow with a login and not on 0.0.0.0, every
node given the MLflow login from a secret, the KubeRay NetworkPolicy, no secrets) and unsafe edits of
copies are caught, a file tracking store is refused on a cluster with nodes on other machines (the node
list simulated), and the DeepSpeed reference configs are what ``tokentune.engine.deepspeed_config``
generates.

Slow (``-m slow``): a real local Ray cluster started with ``ray start`` (its own temp dir, its own
token, loopback addresses only) takes the quickstart sweep through ``ray job submit`` and a second node
joins it; the second node is killed mid-sweep and the sweep still finishes every trial.

Loopback only: Ray rewrites 127.0.0.1 to the machine's LAN address (``resolve_ip_for_localhost``), so the
nodes use the other loopback addresses 127.0.0.2 (head) and 127.0.0.3 (node 2); every connection made
by the cluster and the test stays on ``lo``. The dashboard binds to 127.0.0.1.

Stopping only our cluster: ``ray stop`` stops every Ray process of this user on the machine (other
test sessions' too). Every process of our cluster instead inherits a marker variable from the
``ray start`` that created it (``TOKENTUNE_TEST_CLUSTER=<uuid>``, plus ``TOKENTUNE_TEST_NODE=<node>``);
teardown signals exactly the processes whose environment carries the marker, by pid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tests.conftest import free_port
from tools.cluster_check import (
    ClusterFileError,
    check_cluster_file,
    security_problems,
    validate_cluster_yaml,
    validate_rayjob,
)

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
RAY_UP_FILES = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
ALL_FILES = sorted(p.name for p in CLUSTER.glob("*.yaml"))
BIN = Path(sys.executable).parent  # the virtualenv's bin: ray, python
MARKER = "TOKENTUNE_TEST_CLUSTER"
NODE_MARKER = "TOKENTUNE_TEST_NODE"
HEAD_IP, NODE2_IP = "127.0.0.2", "127.0.0.3"
EXCLUDES = [
    ".git",
    "runs",
    "sweeps",
    "mlruns",
    "*.db",
    ".venv",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
]
JOB_TIMEOUT_S = 1500  # the machine may be shared and loaded: generous
#: each node's Ray memory: 3 trial drivers (tune.driver_memory_gb, 1 GB). Ray packs drivers on a node until
#: half its memory is reserved, so with two trials at once the second driver must go to the other node
NODE_MEMORY = 3 * 1024**3
AFTER_KILL_TIMEOUT_S = 900  # the rest of the two-node sweep: ~40 s alone, ~4 min on a loaded machine


# ==== the files (fast) ====================================================================================
def test_every_cluster_file_is_covered():
    assert set(RAY_UP_FILES) | {"kuberay-rayjob.yaml"} == set(ALL_FILES)


def test_init_ray_yields_to_a_submitted_jobs_runtime_env(monkeypatch):
    """Inside ``ray job submit`` Ray refuses a ray.init runtime_env overlapping the job's: ours yields."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from orchestrator.run.ray_cluster import without_job_conflicts

    ours = {"env_vars": {"PYTHONPATH": "/x", "HF_HUB_OFFLINE": "1"}, "working_dir": "/ours"}
    assert without_job_conflicts(ours) == ours  # not inside a job: unchanged
    job = {"runtime_env": {"working_dir": "/job", "env_vars": {"HF_HUB_OFFLINE": "0"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _merge_runtime_env(job["runtime_env"], ours) is None  # what Ray would refuse
    kept = without_job_conflicts(ours)
    assert kept == {"env_vars": {"PYTHONPATH": "/x"}}
    merged = _merge_runtime_env(job["runtime_env"], kept)
    assert (
        merged["env_vars"] == {"HF_HUB_OFFLINE": "0", "PYTHONPATH": "/x"} and merged["working_dir"] == "/job"
    )


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_file_passes_rays_own_validation(name):
    """prepare_config (provider defaults, merged setup commands, min/max workers) + validate_config
    (ray-schema.json + cross-field checks): what `ray up` runs before it asks the cloud for anything."""
    cfg = validate_cluster_yaml(CLUSTER / name)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert any("--head" in c and "--dashboard-host=127.0.0.1" in c for c in starts)
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])
    assert any(
        "pip install" in c and "torch" in c for c in cfg["head_setup_commands"] + cfg["worker_setup_commands"]
    )
    if cfg["provider"]["type"] in ("aws", "gcp"):
        gpu = types["gpu_worker"]
        assert 1 <= gpu["min_workers"] < gpu["max_workers"] <= cfg["max_workers"]  # autoscaling GPU group
        assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # CPU head: no trial work on it
        docker = cfg["docker"]
        assert docker["head_image"].endswith("-cpu") and docker["worker_image"].endswith("-gpu")
        assert any("://BUCKET/mlflow" in c for c in cfg["head_start_ray_commands"])
    else:
        assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]


def test_ray_up_validation_names_a_bad_key(tmp_path):
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["max_worker"] = 3  # typo
    bad = tmp_path / "aws.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ClusterFileError, match="max_worker"):
        validate_cluster_yaml(bad)
    raw = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["resources"] = {"GPU": "one"}
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ClusterFileError, match="resources"):
        validate_cluster_yaml(bad)


def test_kuberay_rayjob_has_the_required_fields():
    job = validate_rayjob(CLUSTER / "kuberay-rayjob.yaml")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("tokentune sweep ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "SidecarMode"  # the submitter reaches the dashboard on 127.0.0.1
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    (gpu,) = cluster["workerGroupSpecs"]
    assert 1 <= gpu["minReplicas"] < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1


def test_rayjob_check_names_what_is_missing(tmp_path):
    job, policy = yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text())
    del job["spec"]["rayClusterSpec"]["authOptions"]
    bad = tmp_path / "job.yaml"
    bad.write_text(yaml.safe_dump_all([job, policy]))
    with pytest.raises(ClusterFileError, match="authOptions"):
        validate_rayjob(bad)


@pytest.mark.parametrize("name", ALL_FILES)
def test_cluster_file_keeps_the_security_rules(name):
    assert security_problems(CLUSTER / name) == []
    check_cluster_file(CLUSTER / name)


def _edit(tmp_path, name, old, new):
    text = (CLUSTER / name).read_text()
    assert old in text, old
    out = tmp_path / name
    out.write_text(text.replace(old, new))
    return security_problems(out)


def test_security_check_catches_unsafe_edits(tmp_path):
    off = "RAY_AUTH_MODE=" + "disabled"  # spelled in two parts so no file in the repo contains it whole
    assert any(
        "dashboard" in p
        for p in _edit(tmp_path, "aws.yaml", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
    )
    assert any("authentication" in p for p in _edit(tmp_path, "gcp.yaml", "RAY_AUTH_MODE=token", off))
    assert any("MLflow" in p for p in _edit(tmp_path, "onprem.yaml", '--host "$HEAD_IP"', "--host 0.0.0.0"))
    key = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert any(
        "secret" in p
        for p in _edit(tmp_path, "aws.yaml", "cluster_name: tokentune", f"cluster_name: tokentune\n# {key}")
    )
    assert any(
        "token authentication" in p
        for p in _edit(tmp_path, "kuberay-rayjob.yaml", "mode: token", "mode: disabled")
    )
    assert any(
        "RAY_AUTH_TOKEN" in p
        for p in _edit(
            tmp_path,
            "kuberay-rayjob.yaml",
            "- name: POD_IP",
            "- name: RAY_AUTH_TOKEN\n                  value: abc\n                - name: POD_IP",
        )
    )


# ---- MLflow authentication, the nodes' MLflow login, the KubeRay NetworkPolicy ------------------------------
WEAK = "hunter2" + "hunter2"  # a literal password, spelled in two parts like the other secrets here


def _policy_edit(tmp_path, change):
    """security_problems of a copy of the KubeRay manifest after ``change(job, docs)`` edits its documents."""
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()))
    change(docs[0], docs)
    out = tmp_path / "kuberay-rayjob.yaml"
    out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return security_problems(out)


def _head(job):
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]


def _container(job, name):
    groups = [_head(job), *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    return next(c for g in groups for c in g["template"]["spec"]["containers"] if c["name"] == name)


@pytest.mark.parametrize("name", ALL_FILES)
def test_the_mlflow_server_requires_a_login(tmp_path, name):
    assert "mlflow server --app-name basic-auth" in (CLUSTER / name).read_text()
    problems = _edit(tmp_path, name, "mlflow server --app-name basic-auth", "mlflow server")
    assert any("without authentication" in p and "--app-name basic-auth" in p for p in problems), problems


def test_a_literal_mlflow_password_is_caught(tmp_path):
    admin = "MLFLOW_AUTH_ADMIN_PASSWORD=$(cut -d: -f2- /home/ray/.tokentune/mlflow_auth)"
    assert any(
        "secret" in p for p in _edit(tmp_path, "aws.yaml", admin, f"MLFLOW_AUTH_ADMIN_PASSWORD={WEAK}")
    )
    client = "MLFLOW_TRACKING_PASSWORD=$(cut -d: -f2- ~/.tokentune/mlflow_auth);\n    ray start --address"
    literal = f"MLFLOW_TRACKING_PASSWORD={WEAK};\n    ray start --address"
    assert any("secret" in p for p in _edit(tmp_path, "onprem.yaml", client, literal))
    ini = "default_permission = READ\\n"
    assert any("secret" in p for p in _edit(tmp_path, "gcp.yaml", ini, ini + f"admin_password = {WEAK}\\n"))
    uri = "MLFLOW_TRACKING_URI=$(cat /home/ray/mlflow/tracking_uri)"
    in_uri = f"MLFLOW_TRACKING_URI=http://admin:{WEAK}@10.0.0.1:5000"
    assert any("secret" in p for p in _edit(tmp_path, "aws.yaml", uri, in_uri))

    def literal_admin(job, docs):
        env = _container(job, "mlflow")["env"]
        next(e for e in env if e["name"] == "MLFLOW_AUTH_ADMIN_PASSWORD").update(value=WEAK)

    problems = _policy_edit(tmp_path, literal_admin)
    assert any("MLFLOW_AUTH_ADMIN_PASSWORD is written" in p for p in problems), problems


def test_every_node_gets_the_mlflow_login(tmp_path):
    login = (
        "\n    MLFLOW_TRACKING_USERNAME=$(cut -d: -f1 /home/ray/.tokentune/mlflow_auth)"
        "\n    MLFLOW_TRACKING_PASSWORD=$(cut -d: -f2- /home/ray/.tokentune/mlflow_auth);"
        "\n    ray start --address"
    )
    problems = _edit(tmp_path, "gcp.yaml", login, ";\n    ray start --address")
    assert any("no MLflow login" in p and "--address" in p for p in problems), problems

    def no_login(job, docs):
        worker = _container(job, "ray-worker")
        worker["env"] = [e for e in worker["env"] if not e["name"].startswith("MLFLOW_TRACKING_")]

    problems = _policy_edit(tmp_path, no_login)
    assert any("'ray-worker' gets no MLflow login" in p for p in problems), problems


def test_the_kuberay_manifest_needs_a_network_policy(tmp_path):
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["RayJob", "NetworkPolicy"]
    policy = docs[1]["spec"]
    assert policy["policyTypes"] == ["Ingress"] and "ports" not in policy["ingress"][0]  # every port
    (peer,) = policy["ingress"][0]["from"]
    assert {"key": "ray.io/cluster", "operator": "Exists"} in peer["podSelector"]["matchExpressions"]

    problems = _policy_edit(tmp_path, lambda job, docs: docs.pop())
    assert any("no NetworkPolicy" in p and "MLflow's 5000" in p and "GCS 6379" in p for p in problems)
    # without the policy, MLflow on every interface of the pod is no longer acceptable
    assert any("binds to every interface" in p for p in problems), problems

    def other_pods(job, docs):
        docs[1]["spec"]["podSelector"] = {"matchLabels": {"app": "something-else"}}

    assert any("no NetworkPolicy" in p for p in _policy_edit(tmp_path, other_pods))


@pytest.mark.parametrize(
    "peer, said",
    [
        ({"namespaceSelector": {}}, "namespaceSelector"),
        ({"ipBlock": {"cidr": "0.0.0.0/0"}}, "ipBlock"),
        ({"podSelector": {}}, "pods {}"),
        (
            {"podSelector": {"matchLabels": {"tokentune.io/rayjob": "tokentune-sweep"}}},
            "pods",
        ),  # no ray.io/cluster
        (None, "every source"),
    ],
)
def test_the_network_policy_admits_only_this_ray_clusters_pods(tmp_path, peer, said):
    def widen(job, docs):
        rules = docs[1]["spec"]["ingress"]
        if peer is None:
            rules.append({"ports": [{"port": 5000}]})  # a rule without `from`: anyone
        else:
            rules[0]["from"].append(peer)

    problems = _policy_edit(tmp_path, widen)
    assert any("not only this Ray cluster's pods" in p and said in p for p in problems), problems


def test_the_network_policy_admits_the_ray_and_mlflow_ports(tmp_path):
    def ports(listed, worker_range=None):
        def change(job, docs):
            docs[1]["spec"]["ingress"][0]["ports"] = [{"port": n} for n in listed]
            if worker_range:
                for g in [_head(job), *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]:
                    g["rayStartParams"].update({"min-worker-port": "10002", "max-worker-port": "10100"})
                    docs[1]["spec"]["ingress"][0]["ports"].append(worker_range)

        return _policy_edit(tmp_path, change)

    problems = ports([6379, 8265, 10001])
    assert [p for p in problems if "port" in p] == [
        f"{tmp_path / 'kuberay-rayjob.yaml'}: the NetworkPolicy does not admit MLflow's port 5000 from this Ray "
        "cluster's pods"
    ]
    assert ports([6379, 8265, 10001, 5000]) == []
    assert ports([6379, 8265, 10001, "mlflow"]) == []  # a named container port
    assert ports([6379, 8265, 10001, 5000], {"port": 10002, "endPort": 10100}) == []
    short = ports([6379, 8265, 10001, 5000], {"port": 10002, "endPort": 10050})
    assert any("worker port range(10002, 10101)" in p for p in short), short


def test_mlflow_on_every_interface_of_a_pod_needs_the_pods_own_network(tmp_path):
    def host_network(job, docs):
        _head(job)["template"]["spec"]["hostNetwork"] = True

    assert any("binds to every interface" in p for p in _policy_edit(tmp_path, host_network))
    assert any("MLflow" in p for p in _edit(tmp_path, "aws.yaml", '--host "$HEAD_IP"', "--host 0.0.0.0"))


# ---- a file tracking store on a cluster of several machines ------------------------------------------------
def test_nodes_on_other_machines_are_told_by_hostname():
    from orchestrator.run.ray_cluster import nodes_on_other_machines

    nodes = [
        {"Alive": True, "NodeManagerHostname": "head", "NodeManagerAddress": "10.0.0.1"},
        {"Alive": True, "NodeManagerHostname": "head", "NodeManagerAddress": "127.0.0.3"},  # same machine
        {"Alive": True, "NodeManagerHostname": "gpu-1", "NodeManagerAddress": "10.0.0.2"},
        {"Alive": False, "NodeManagerHostname": "gpu-2", "NodeManagerAddress": "10.0.0.3"},  # dead
    ]
    assert nodes_on_other_machines(nodes, hostname="head") == ["10.0.0.2"]
    assert nodes_on_other_machines(nodes[:2], hostname="head") == []  # the local multi-node tests


@pytest.mark.parametrize(
    "uri, refused",
    [
        ("sqlite:////tmp/s/mlflow.db", True),
        ("file:///tmp/s/mlruns", True),
        ("/tmp/s/mlflow.db", True),
        ("http://10.0.0.1:5000", False),
        ("postgresql://mlflow@db:5432/mlflow", False),
        ("databricks", False),
    ],
)
def test_a_file_tracking_store_is_refused_when_nodes_run_elsewhere(tmp_path, uri, refused):
    from orchestrator.results.tracking import default_tracking_uri
    from orchestrator.spec.sweep import SpecError
    from orchestrator.spec.validate import refuse_local_store_on_cluster

    uri = default_tracking_uri(tmp_path, uri)  # as the sweep resolves it (absolute; names unchanged)
    refuse_local_store_on_cluster(uri, "tracking.uri", [])  # one machine: always fine
    if not refused:
        refuse_local_store_on_cluster(uri, "tracking.uri", ["10.0.0.2"])
        return
    with pytest.raises(SpecError) as info:
        refuse_local_store_on_cluster(uri, "tracking.uri", ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"])
    err = str(info.value)
    assert (
        info.value.key == "tracking.uri"
        and repr(uri) in err
        and "10.0.0.2, 10.0.0.3, 10.0.0.4 and 1 more" in err
    )
    assert "mlflow server" in err and "http://<head>:5000" in err and "MLFLOW_TRACKING_URI" in err


def test_a_sweep_on_a_multi_machine_cluster_refuses_sqlite_before_anything_is_written(tmp_path, monkeypatch):
    """The Ray cluster is simulated: init_ray returns at once and two nodes run on other machines."""
    import orchestrator.results.tracking
    import orchestrator.run.ray_cluster as rc
    import orchestrator.run.tuner
    from orchestrator import run_sweep
    from orchestrator.spec.sweep import SpecError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(orchestrator.run.tuner, "set_tune_env", lambda verbose=False: None)
    monkeypatch.setattr(rc, "init_ray", lambda address=None, **kw: {"CPU": 16.0})
    monkeypatch.setattr(rc, "nodes_on_other_machines", lambda: ["10.0.0.2", "10.0.0.3"])
    sweep = ["search_spaces/quickstart.yaml", [f"storage={tmp_path}"]]
    with pytest.raises(SpecError) as info:
        run_sweep(*sweep, progress=False)
    err = str(info.value)
    assert info.value.key == "tracking.uri" and "the default: a SQLite file" in err
    assert f"sqlite:///{tmp_path}" in err and "10.0.0.2, 10.0.0.3" in err and "cluster/README.md" in err
    sweep_dir = tmp_path / "quickstart"
    assert not (sweep_dir / "sweep.yaml").exists() and not (sweep_dir / "mlflow.db").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    with pytest.raises(SpecError, match="from MLFLOW_TRACKING_URI"):
        run_sweep(*sweep, progress=False)

    class Reached(Exception):
        pass

    def tracker(*args, **kwargs):
        raise Reached  # past the check: the sweep would start its MLflow parent run now

    monkeypatch.setattr(orchestrator.results.tracking, "SweepTracker", tracker)
    with pytest.raises(Reached):  # a tracking server is fine on any cluster
        run_sweep(sweep[0], [*sweep[1], "tracking.uri=http://10.0.0.1:5000"], progress=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr(rc, "nodes_on_other_machines", lambda: [])
    with pytest.raises(Reached):  # every node on this machine: the SQLite file is theirs too
        run_sweep(*sweep, name="one_machine", progress=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_reference_configs_are_what_the_engine_generates(stage):
    """cluster/deepspeed/zero{2,3}.json = deepspeed_config(...) for 2 workers, batch 16, grad_accum 1,
    max_grad_norm 1.0, bf16: the run config's compute.zero_stage generates these at run time."""
    import tokentune.engine as engine

    with mock.patch.object(engine, "dist_info", return_value=(0, 2)):
        generated = engine.deepspeed_config(stage, 16, 1, 1.0, True)
    assert json.loads((CLUSTER / "deepspeed" / f"zero{stage}.json").read_text()) == generated


def test_readme_walks_through_launch_submit_follow_resume_teardown():
    text = (CLUSTER / "README.md").read_text()
    for needle in (
        "ray up cluster/aws.yaml",
        "ray job submit",
        "RAY_AUTH_MODE=token",
        "ray job logs",
        "5000",
        "--resume",
        "ray down",
        "ray start --head",
        "zero_stage",
        "--app-name basic-auth",  # MLflow with a login: the secret, opening the UI, the NetworkPolicy
        "~/.tokentune/mlflow_auth",
        "kubectl create secret generic tokentune-mlflow-auth",
        "kubectl port-forward $HEAD_POD 5000:5000",
        "NetworkPolicy",
        "log in",
    ):
        assert needle in text, needle


# ==== a real local cluster (slow) ===========================================================================
def _loopback_usable(ip: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


class LocalRayCluster:
    """Ray nodes started with ``ray start`` on this machine; stopped by the pids that carry our marker."""

    def __init__(self, root: Path):
        self.root = root
        self.id = uuid.uuid4().hex
        self.token_path = root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.gcs = f"{HEAD_IP}:{self.gcs_port}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy

    # -- environments --------------------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", MARKER, NODE_MARKER))}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this virtualenv's
            NO_PROXY="127.0.0.1,127.0.0.2,127.0.0.3,localhost",
            no_proxy="127.0.0.1,127.0.0.2,127.0.0.3,localhost",
            RAY_USAGE_STATS_ENABLED="0",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            DS_ACCELERATOR="cpu",
            MLFLOW_ALLOW_FILE_STORE="false",
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("PYTHONPATH", None)
        return env

    def client_env(self, token: bool = True) -> dict[str, str]:
        env = self._base_env()
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        else:  # no token anywhere: not in the env, not in ~/.ray/auth_token
            env["HOME"] = str(self.root / "empty_home")
            Path(env["HOME"]).mkdir(exist_ok=True)
        return env

    def node_env(self, node: str) -> dict[str, str]:
        env = self.client_env()
        # RAY_ADDRESS: in-cluster state-API clients (Ray Train's placement-group cleaner) must find THIS
        # cluster even when other Ray clusters run on the machine (else: "Found multiple active Ray
        # instances" and leaked placement groups after a node failure).
        env.update({"RAY_ADDRESS": self.gcs, MARKER: self.id, NODE_MARKER: node})
        return env

    # -- nodes ---------------------------------------------------------------------------------------
    def ray(self, *args: str, env: dict[str, str], timeout: float = 300, check: bool = True):
        proc = subprocess.run(
            [str(BIN / "ray"), *args],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ray {' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def _start_node(self, node: str, args: list[str], attempts: int = 3) -> None:
        """``ray start`` for one node; retried on a loaded machine (Ray gives a new raylet 30 s to
        register with the GCS, then gives up)."""
        for attempt in range(1, attempts + 1):
            shutil.rmtree(self.root / node, ignore_errors=True)
            try:
                self.ray(
                    "start",
                    *args,
                    f"--temp-dir={self.root / node}",
                    "--disable-usage-stats",
                    f"--dashboard-agent-listen-port={free_port()}",
                    env=self.node_env(node),
                )
                return
            except (AssertionError, subprocess.TimeoutExpired) as e:
                self.kill(node)
                if attempt == attempts:
                    raise
                print(f"[cluster] ray start of {node} failed (attempt {attempt}), retrying: {str(e)[-300:]}")

    def start_head(self, num_cpus: int = 2) -> None:
        self._start_node(
            "head",
            [
                "--head",
                f"--node-ip-address={HEAD_IP}",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash_port}",
                f"--ray-client-server-port={free_port()}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--memory={NODE_MEMORY}",
                "--object-store-memory=300000000",
            ],
        )
        self.wait_for(lambda: len(self.alive_nodes()) == 1, 180, "the head node to register")

    def add_node(self, node: str, ip: str, num_cpus: int = 2) -> None:
        self._start_node(
            node,
            [
                f"--address={self.gcs}",
                f"--node-ip-address={ip}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--memory={NODE_MEMORY}",
                f"--resources={json.dumps({node: 1})}",
                "--object-store-memory=300000000",
            ],
        )

    def pids(self, node: str | None = None) -> list[int]:
        """Our processes: those whose environment carries the marker (and the node's, if given), and
        their descendants (should a child ever be started with a cleaned environment)."""
        want = [f"{MARKER}={self.id}".encode()] + ([f"{NODE_MARKER}={node}".encode()] if node else [])
        marked, parent = set(), {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                env = (d / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if state == "Z":  # already dead, waiting to be reaped
                continue
            parent[int(d.name)] = int(ppid)
            if all(w in env for w in want):
                marked.add(int(d.name))
        grew = True
        while grew:
            more = {pid for pid, ppid in parent.items() if ppid in marked and pid not in marked}
            marked |= more
            grew = bool(more)
        return sorted(marked)

    def kill(self, node: str | None = None, grace_s: float = 15.0) -> None:
        pids = self.pids(node)
        sig = signal.SIGKILL if grace_s <= 0 else signal.SIGTERM
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while grace_s > 0 and time.time() < deadline and self.pids(node):
            time.sleep(0.5)
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and self.pids(node):
            time.sleep(0.5)

    # -- dashboard HTTP API (jobs, state) ----------------------------------------------------------
    def api(self, path: str, token: bool = True, timeout: float = 60):
        req = urllib.request.Request(self.dashboard + path)
        if token:
            req.add_header("Authorization", f"Bearer {self.token_path.read_text().strip()}")
        with self._opener.open(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def _state(self, kind: str) -> list[dict]:
        data = self.api(f"/api/v0/{kind}?limit=10000&detail=1")
        res = data.get("data", {}).get("result", {})
        return res.get("result", []) if isinstance(res, dict) else res

    def nodes(self) -> list[dict]:
        return self._state("nodes")

    def alive_nodes(self) -> list[dict]:
        try:
            return [n for n in self.nodes() if n.get("state") == "ALIVE"]
        except (urllib.error.URLError, OSError, ValueError):
            return []

    def actors(self) -> list[dict]:
        return self._state("actors")

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        self.ray(
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--submission-id",
            submission_id,
            "--no-wait",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"excludes": EXCLUDES}),
            "--",
            *entrypoint,
            env=self.client_env(),
        )

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]

    def job_logs(self, submission_id: str) -> str:
        try:
            return self.api(f"/api/jobs/{submission_id}/logs").get("logs", "")
        except (urllib.error.URLError, OSError, ValueError) as e:
            return f"(logs unavailable: {e})"

    def wait_job(self, submission_id: str, timeout: float = JOB_TIMEOUT_S, every=None) -> str:
        deadline = time.time() + timeout
        status = "?"
        while time.time() < deadline:
            try:
                status = self.job_status(submission_id)
            except (urllib.error.URLError, OSError, ValueError):
                status = "?"
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            if every is not None:
                every()
            time.sleep(5)
        return f"TIMEOUT (last status {status})"

    @staticmethod
    def wait_for(cond, timeout: float, what: str, every: float = 2.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux" or not _loopback_usable(HEAD_IP) or not _loopback_usable(NODE2_IP):
        pytest.skip("needs Linux loopback addresses 127.0.0.2/127.0.0.3 (all of 127/8 on lo)")
    root = Path(tempfile.mkdtemp(prefix="ttrc_", dir="/tmp"))  # short: Ray's unix socket paths live here
    c = LocalRayCluster(root)
    t0 = time.time()
    try:
        c.start_head()
        print(f"\n[cluster] head up in {time.time() - t0:.0f}s: gcs {c.gcs}, dashboard {c.dashboard}")
        yield c
    finally:
        c.kill()
        left = c.pids()
        if not os.environ.get("TOKENTUNE_KEEP_CLUSTER_TMP"):
            shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive: {left}"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port`` (from /proc/net/tcp, tcp6)."""
    out = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                if width == 8:
                    out.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, 32, 8))
                    out.add(socket.inet_ntop(socket.AF_INET6, raw))
    return out


def _mlflow_runs(sweep_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir / 'mlflow.db'}")
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tokentune.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("tokentune.role") == "trial"]
    return parents, children


def _statuses(sweep_dir: Path) -> dict[str, dict]:
    out = {}
    for d in sorted((sweep_dir / "trials").glob("*")):
        f = d / "status.json"
        out[d.name] = json.loads(f.read_text()) if f.is_file() else {"status": "missing"}
    return out


def _sweep_cmd(name: str, storage: Path, *sets: str) -> list[str]:
    cmd = [
        "python",
        "-m",
        "orchestrator.cli",
        "sweep",
        "search_spaces/quickstart.yaml",
        "--name",
        name,
        "--set",
        f"storage={storage}",
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _check_token_auth(cluster) -> None:
    """The dashboard listens on loopback only, and authentication really is on: a client without a
    token, or with a wrong one, is refused (CLI and REST)."""
    assert _listening_addresses(cluster.dash_port) == {"127.0.0.1"}
    no_token = cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--no-wait",
        "--",
        "echo",
        "hi",
        env=cluster.client_env(token=False),
        check=False,
        timeout=180,
    )
    assert no_token.returncode != 0
    assert "authentication" in (no_token.stdout + no_token.stderr).lower()
    wrong = {
        **cluster.client_env(token=False),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    bad = cluster.ray("job", "list", "--address", cluster.dashboard, env=wrong, check=False, timeout=180)
    assert bad.returncode != 0
    with pytest.raises(urllib.error.HTTPError) as e:
        cluster.api("/api/jobs/", token=False)
    assert e.value.code == 401


def _on_node(actors: list[dict], node_id: str, name: str, state: str | None = "ALIVE") -> list[dict]:
    return [
        a
        for a in actors
        if name in a.get("class_name", "")
        and a.get("node_id") == node_id
        and (state is None or a.get("state") == state)
    ]


@pytest.mark.slow
@pytest.mark.ray
def test_job_submit_runs_a_two_node_sweep_that_survives_losing_a_node(cluster):
    """``ray job submit`` (token auth) runs a sweep across two nodes with merge + lm-eval + MLflow after
    each trial; killing one node mid-sweep loses nothing finished and the sweep completes."""
    t0 = time.time()
    _check_token_auth(cluster)
    cluster.add_node("node2", NODE2_IP)
    cluster.wait_for(lambda: len(cluster.alive_nodes()) == 2, 180, "node2 to join")
    nodes = {n["node_ip"]: n["node_id"] for n in cluster.alive_nodes()}
    assert set(nodes) == {HEAD_IP, NODE2_IP}, nodes  # every node on loopback
    head_id, node2_id = nodes[HEAD_IP], nodes[NODE2_IP]
    print(f"[cluster] node2 joined in {time.time() - t0:.0f}s")

    storage = cluster.root / "sweeps"
    sweep_dir = storage / "two_nodes"
    job = "tt-2n-" + uuid.uuid4().hex[:6]
    # 3 trials whose Train worker takes a whole node (2 CPUs): two run at once, necessarily one per node;
    # the short one (4 steps, then merge + a small lm-eval) finishes first and the third starts in its
    # place, so when the first trial is finished a long one (120 steps, a checkpoint every 8) is still
    # training on node2 whichever way the first two were placed.
    cluster.submit(
        job,
        _sweep_cmd(
            "two_nodes",
            storage,
            "methods=[lora]",
            "lora.rank=4",
            "search.train.max_steps={grid: [4, 120, 121]}",
            "compute.cpus_per_worker=2",
            "train.save_every=8",
            "train.log_every=4",
            "eval.limit=4",
            "tune.max_failures=3",
        ),
    )

    seen: dict[str, set[str]] = {"RayTrainWorker": set(), "ImplicitFunc": set()}

    def observe() -> None:
        try:
            for a in cluster.actors():
                for name, where in seen.items():
                    if name in a.get("class_name", "") and a.get("node_id"):
                        where.add(a["node_id"])
        except (urllib.error.URLError, OSError, ValueError):
            pass

    def ready_to_kill() -> bool:
        observe()
        done = [t for t, s in _statuses(sweep_dir).items() if s["status"] == "finished"]
        try:
            busy = _on_node(cluster.actors(), node2_id, "RayTrainWorker")
        except (urllib.error.URLError, OSError, ValueError):
            busy = []
        if cluster.job_status(job) in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError(
                f"the sweep ended before node2 could be killed:\n{cluster.job_logs(job)[-4000:]}"
            )
        return bool(done) and bool(busy)

    cluster.wait_for(ready_to_kill, JOB_TIMEOUT_S, "a finished trial while node2 runs Train workers", every=3)
    before = {t: s for t, s in _statuses(sweep_dir).items() if s["status"] == "finished"}
    _, children_before = _mlflow_runs(sweep_dir)
    runs_before = {r.data.tags["tokentune.trial_id"]: r.info.run_id for r in children_before}
    assert seen["RayTrainWorker"] >= {head_id, node2_id}, f"Train workers only on {seen} (head {head_id})"
    # trial drivers reserve what they and their Train controllers use (tune.driver_memory_gb): spread too
    assert seen["ImplicitFunc"] >= {head_id, node2_id}, f"trial drivers only on {seen} (head {head_id})"
    t_kill = time.time()
    victims = cluster.pids("node2")
    cluster.kill("node2", grace_s=0)  # SIGKILL every process of node 2: the machine is gone
    print(
        f"[cluster] killed node2 ({len(victims)} processes) at {t_kill - t0:.0f}s; finished before: {sorted(before)}"
    )

    status = cluster.wait_job(job, AFTER_KILL_TIMEOUT_S, every=observe)
    logs = cluster.job_logs(job)
    (cluster.root / "job.log").write_text(logs)  # kept with TOKENTUNE_KEEP_CLUSTER_TMP=1
    assert status == "SUCCEEDED", f"job {job}: {status}\n{_diagnosis(cluster, sweep_dir, logs)}"
    print(
        f"[cluster] two-node sweep {status} {time.time() - t_kill:.0f}s after the kill ({time.time() - t0:.0f}s in all)"
    )

    dead = [n for n in cluster.nodes() if n["node_id"] == node2_id]
    assert dead and dead[0]["state"] == "DEAD"
    statuses = _statuses(sweep_dir)
    assert len(statuses) == 3 and all(s["status"] == "finished" for s in statuses.values()), statuses
    for t, s in before.items():  # nothing completed is lost or redone
        assert statuses[t]["time"] == s["time"] and statuses[t]["metrics"] == s["metrics"]
        starts = [e for e in _events(sweep_dir, t) if e["event"] == "train started"]
        assert len(starts) == 1, (t, starts)
    parents, children = _mlflow_runs(sweep_dir)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [r.data.tags["tokentune.trial_id"] for r in children]
    assert sorted(ids) == sorted(statuses), ids  # one child run per trial, none duplicated
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    for r in children:  # merged and evaluated inside the submitted job, logged to MLflow
        assert "eval/score" in r.data.metrics, r.data.metrics.keys()
    assert (sweep_dir / "results.csv").is_file()
    for t, run_id in runs_before.items():
        assert {r.data.tags["tokentune.trial_id"]: r.info.run_id for r in children}[t] == run_id
    restarted = {
        t: len([e for e in _events(sweep_dir, t) if e["event"] == "train started"]) for t in statuses
    }
    print(
        f"[cluster] trial drivers ran on {len(seen['ImplicitFunc'])} node(s), Train workers on "
        f"{len(seen['RayTrainWorker'])}; 'train started' per trial: {restarted}"
    )


def _diagnosis(cluster, sweep_dir: Path, logs: str) -> str:
    """What a failed or hung two-node job looked like: its log without the repeated progress lines,
    each trial's last events, the actors that are not dead and the placement groups."""
    lines = logs.splitlines()
    progress = [i for i, line in enumerate(lines) if "trials done" in line]
    between = set(progress[1:-1])
    kept = [line for i, line in enumerate(lines) if i not in between]
    out = ["--- job log (progress lines between the first and the last left out) ---", *kept[-150:]]
    for t in sorted(_statuses(sweep_dir)):
        out.append(f"--- {t}: last events ---")
        out += [json.dumps(e) for e in _events(sweep_dir, t)[-8:]]
    for kind, keys in (
        ("actors", ("class_name", "state", "node_id", "pid")),
        ("placement_groups", ("placement_group_id", "state", "bundles", "creator_job_id")),
    ):
        try:
            rows = [r for r in cluster._state(kind) if r.get("state") not in ("DEAD", "REMOVED")]
        except (urllib.error.URLError, OSError, ValueError) as e:
            rows = []
            out.append(f"({kind} unavailable: {e})")
        out.append(f"--- {kind} not dead: {len(rows)} ---")
        out += [json.dumps({k: r.get(k) for k in keys}, default=str)[:400] for r in rows]
    return "\n".join(out)


def _events(sweep_dir: Path, trial: str) -> list[dict]:
    f = sweep_dir / "trials" / trial / "events.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
