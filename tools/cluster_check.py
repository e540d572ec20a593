"""Offline checks of the cluster files in ``cluster/``: Ray's own schema and the security rules.

    from tools.cluster_check import check_cluster_file
    check_cluster_file("cluster/aws.yaml")          # raises ClusterFileError naming the file and key

``ray up`` files go through Ray's own code path, minus the cloud calls: ``prepare_config`` (merge the
provider's ``defaults.yaml``, setup commands, min/max workers; no SDK or network use) and then
``validate_config`` (``ray/autoscaler/ray-schema.json`` + Ray's cross-field checks). ``ray up`` does
the same two steps before it asks the cloud for anything (``_bootstrap_config``). The KubeRay
manifest (a ``RayJob`` and its ``NetworkPolicy``) has no schema offline (no CRDs here), so its required
fields are checked by hand.

Security rules, for every file (:func:`security_problems`): the Ray dashboard binds to 127.0.0.1;
Ray's token authentication stays on (``RAY_AUTH_MODE=token`` for every ``ray start``, or KubeRay's
``authOptions``); the MLflow server requires a login (``--app-name basic-auth``) and every Ray node
gets the client credentials (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``: from a file on the nodes, or a
Kubernetes Secret); the MLflow server never binds to every interface (0.0.0.0 / ::) -- except inside
a pod of a KubeRay manifest, where that is the pod's own IP and loopback; a KubeRay manifest has a
NetworkPolicy that admits traffic to the Ray pods (Ray's ports, MLflow's) only from this Ray cluster's
pods (``tools.cluster_policy``); and no secret (cloud keys, tokens, private keys, URL or literal
passwords) is written in the file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from tokentune.redact import is_secret_key, redact_text
from tools.cluster_policy import network_policy_problems, strings_in

HEAD_DASHBOARD_HOST = "127.0.0.1"
RAYJOB_API = "ray.io/v1"
ANY_INTERFACE = ("0.0.0.0", "::", "[::]", "*")

# Secrets by shape (the values themselves), in addition to tokentune.redact.redact_text's patterns.
_SECRET_SHAPES = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}"
    r"|\bhf_[A-Za-z0-9]{16,}"
    r"|\"type\":\s*\"service_account\""
)
# key: value pairs whose key names a secret and whose value is a literal (not a reference/placeholder)
_SECRET_ASSIGN = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|secret_access_key|password|passwd|api_key|"
    r"ray_auth_token|hf_token|mlflow_tracking_password|mlflow_tracking_token)\b\s*[:=]\s*['\"]?([^\s'\"#]+)"
)
_MLFLOW_HOST = re.compile(r"mlflow\s+(?:server|ui)\b(?P<args>[^;&|\n]*)")
_HOST_ARG = re.compile(r"(?:--host|-h)[=\s]+['\"]?(?P<host>[^\s'\";]+)")
_BASIC_AUTH = re.compile(r"--app-name[=\s]+['\"]?basic-auth\b")
CLIENT_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class ClusterFileError(ValueError):
    """A cluster file is invalid or unsafe; the message names the file and what is wrong."""


# ---- loading -------------------------------------------------------------------------------------------
def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Every YAML document of the file (a Kubernetes manifest may hold several), each a mapping."""
    p = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise ClusterFileError(f"{p}: cannot be read as YAML: {e}") from e
    for d in docs or [None]:
        if not isinstance(d, dict):
            raise ClusterFileError(f"{p}: expected a mapping at the top level, got {type(d).__name__}")
    return docs


def load_cluster_file(path: str | Path) -> dict[str, Any]:
    """The file's main document: its only one, or (a Kubernetes manifest) its RayJob."""
    docs = load_documents(path)
    return next((d for d in docs if d.get("kind") == "RayJob"), docs[0])


def is_rayjob(config: dict[str, Any]) -> bool:
    return "apiVersion" in config or "kind" in config


# ---- ray up files ---------------------------------------------------------------------------------------
def validate_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """Validate a ``ray up`` file exactly as ``ray up`` would before touching the cloud; returns the
    prepared config (provider defaults merged, setup commands merged, min/max workers filled)."""
    import jsonschema

    p = Path(path)
    raw = load_cluster_file(p)
    if is_rayjob(raw):
        raise ClusterFileError(f"{p}: a Kubernetes manifest, not a `ray up` file (use validate_rayjob)")
    if len(load_documents(p)) > 1:
        raise ClusterFileError(f"{p}: several YAML documents; `ray up` reads one")
    try:
        prepared = _prepare_and_validate(copy.deepcopy(raw))
    except jsonschema.ValidationError as e:
        where = ".".join(str(x) for x in e.absolute_path) or "(top level)"
        raise ClusterFileError(f"{p}: {where}: {e.message}") from e
    except (ValueError, KeyError, RuntimeError, AssertionError) as e:
        raise ClusterFileError(f"{p}: {type(e).__name__}: {e}") from e
    return prepared


def _prepare_and_validate(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own ``prepare_config`` + ``validate_config`` of a ``ray up`` file; returns it prepared."""
    # Private: Ray has no public API that validates a `ray up` file offline; these are what `ray up` runs.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


# ---- KubeRay RayJob ---------------------------------------------------------------------------------
def validate_rayjob(path: str | Path) -> dict[str, Any]:
    """Required fields of a KubeRay ``RayJob`` that runs a sweep (no k8s schema offline)."""
    p = Path(path)
    job = load_cluster_file(p)

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ClusterFileError(f"{p}: {key}: {what}")

    need(job.get("apiVersion") == RAYJOB_API, "apiVersion", f"expected {RAYJOB_API!r}")
    need(job.get("kind") == "RayJob", "kind", "expected 'RayJob'")
    need(bool((job.get("metadata") or {}).get("name")), "metadata.name", "required")
    spec = job.get("spec") or {}
    entry = spec.get("entrypoint") or ""
    need("tokentune sweep" in entry, "spec.entrypoint", "must run `tokentune sweep <spec.yaml>`")
    need(spec.get("shutdownAfterJobFinishes") is True, "spec.shutdownAfterJobFinishes", "must be true")
    cluster = spec.get("rayClusterSpec") or {}
    need(bool(cluster), "spec.rayClusterSpec", "required")
    head = cluster.get("headGroupSpec") or {}
    need(bool(head.get("template")), "spec.rayClusterSpec.headGroupSpec.template", "required")
    params = head.get("rayStartParams") or {}
    need(
        str(params.get("dashboard-host")) == HEAD_DASHBOARD_HOST,
        "spec.rayClusterSpec.headGroupSpec.rayStartParams.dashboard-host",
        f"must be {HEAD_DASHBOARD_HOST!r}",
    )
    workers = cluster.get("workerGroupSpecs") or []
    need(bool(workers), "spec.rayClusterSpec.workerGroupSpecs", "needs at least one worker group")
    gpu_groups = [w for w in workers if _gpu_limit(w) > 0]
    need(bool(gpu_groups), "spec.rayClusterSpec.workerGroupSpecs", "needs a group with nvidia.com/gpu limits")
    for i, w in enumerate(workers):
        key = f"spec.rayClusterSpec.workerGroupSpecs[{i}]"
        need(bool(w.get("groupName")), f"{key}.groupName", "required")
        lo, hi = w.get("minReplicas"), w.get("maxReplicas")
        need(
            isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi,
            f"{key}.minReplicas/maxReplicas",
            "need integers with 0 <= minReplicas <= maxReplicas",
        )
    need(
        _token_auth_in_rayjob(cluster),
        "spec.rayClusterSpec.authOptions",
        "token authentication must be on (authOptions.mode: token, or RAY_AUTH_MODE=token on every container)",
    )
    return job


def _gpu_limit(group: dict[str, Any]) -> float:
    total = 0.0
    for c in ((group.get("template") or {}).get("spec") or {}).get("containers") or []:
        limits = (c.get("resources") or {}).get("limits") or {}
        total += float(limits.get("nvidia.com/gpu", 0) or 0)
    return total


def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
    out = []
    for g in groups:
        out += ((g.get("template") or {}).get("spec") or {}).get("containers") or []
    return out


def _token_auth_in_rayjob(cluster: dict[str, Any]) -> bool:
    if str((cluster.get("authOptions") or {}).get("mode", "")).lower() == "token":
        return True
    ray_containers = [c for c in _containers(cluster) if c.get("name", "").startswith("ray-")]
    return bool(ray_containers) and all(
        any(e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in c.get("env") or [])
        for c in ray_containers
    )


# ---- security -----------------------------------------------------------------------------------------
def security_problems(path: str | Path) -> list[str]:
    """Every broken security rule of a cluster file, as sentences naming the file (empty: all good)."""
    p = Path(path)
    text = p.read_text()
    config = load_cluster_file(p)
    docs = load_documents(p)
    problems: list[str] = []
    strings = list(strings_in(docs))
    commands = [s for s in strings if "ray start" in s or "mlflow" in s]

    for s in strings:
        if re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", s):
            problems.append(f"{p}: token authentication is switched off ({s.strip()[:80]!r})")
    problems += _ray_problems(p, config, commands)
    if is_rayjob(config):  # a container's command + args, as one command line
        cluster = (config.get("spec") or {}).get("rayClusterSpec") or {}
        strings += [
            " ".join(map(str, (c.get("command") or []) + (c.get("args") or []))) for c in _containers(cluster)
        ]
    servers = list(dict.fromkeys(m["args"] for s in strings for m in _MLFLOW_HOST.finditer(s)))
    in_pod_ok = is_rayjob(config) and not _host_network(config) and not network_policy_problems(p, docs)
    for args in servers:
        hm = _HOST_ARG.search(args)
        host = hm["host"] if hm else "127.0.0.1"
        if host in ANY_INTERFACE and not in_pod_ok:
            problems.append(
                f"{p}: the MLflow server binds to every interface ({host}); bind 127.0.0.1 or "
                "the head's private IP"
            )
        if not _BASIC_AUTH.search(args):
            problems.append(
                f"{p}: the MLflow server runs without authentication: add `--app-name basic-auth` (admin "
                f"user and password from a secret, see cluster/README.md): {args.strip()[:100]!r}"
            )
    if servers:
        problems += _client_credential_problems(p, config, commands)
    if is_rayjob(config):
        problems += network_policy_problems(p, docs)
    problems += _secret_problems(p, text)
    return problems


def _ray_problems(p: Path, config: dict[str, Any], commands: list[str]) -> list[str]:
    """The Ray head's dashboard bound to 127.0.0.1 and token authentication on (a RayJob's cluster spec,
    else every `ray start` command); no secret written into a RayJob's container env."""
    problems: list[str] = []
    if is_rayjob(config):
        cluster = (config.get("spec") or {}).get("rayClusterSpec") or {}
        host = ((cluster.get("headGroupSpec") or {}).get("rayStartParams") or {}).get("dashboard-host")
        if str(host) != HEAD_DASHBOARD_HOST:
            problems.append(
                f"{p}: the head's rayStartParams.dashboard-host is {host!r}, not {HEAD_DASHBOARD_HOST}"
            )
        if not _token_auth_in_rayjob(cluster):
            problems.append(f"{p}: token authentication is not on (authOptions.mode: token)")
        for c in _containers(cluster):
            for e in c.get("env") or []:
                if is_secret_key(str(e.get("name", ""))) and "value" in e:
                    problems.append(f"{p}: {e['name']} is written in the file; use valueFrom.secretKeyRef")
    else:
        starts = [s for s in commands if "ray start" in s]
        if not starts:
            problems.append(f"{p}: no `ray start` command found")
        for s in starts:
            if "--head" in s and not re.search(r"--dashboard-host[=\s]+127\.0\.0\.1\b", s):
                problems.append(
                    f"{p}: a head `ray start` does not bind the dashboard to 127.0.0.1: {s.strip()[:120]!r}"
                )
            if not re.search(r"RAY_AUTH_MODE=token\b", s):
                problems.append(f"{p}: a `ray start` runs without RAY_AUTH_MODE=token: {s.strip()[:120]!r}")
    return problems


def _client_credential_problems(p: Path, config: dict[str, Any], commands: list[str]) -> list[str]:
    """Every Ray node's processes (sweep driver, trials) get the MLflow login from a secret."""
    missing = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
    if not is_rayjob(config):
        return [
            f"{p}: a `ray start` gives its node no MLflow login ({missing} in its environment, read from "
            f"the credentials file): trials there cannot log to the server: {s.strip()[:100]!r}"
            for s in commands
            if "ray start" in s and not all(re.search(rf"\b{k}=", s) for k in CLIENT_CREDENTIALS)
        ]
    cluster = (config.get("spec") or {}).get("rayClusterSpec") or {}
    out = []
    for c in _containers(cluster):
        env = {e.get("name"): e for e in c.get("env") or []}
        refs = [((env.get(k) or {}).get("valueFrom") or {}).get("secretKeyRef") for k in CLIENT_CREDENTIALS]
        if c.get("name", "").startswith("ray-") and not all(refs):
            out.append(
                f"{p}: container {c.get('name')!r} gets no MLflow login ({missing} from a Secret, "
                "valueFrom.secretKeyRef): trials there cannot log to the server"
            )
    return out


def _host_network(config: dict[str, Any]) -> bool:
    head = ((config.get("spec") or {}).get("rayClusterSpec") or {}).get("headGroupSpec") or {}
    return bool(((head.get("template") or {}).get("spec") or {}).get("hostNetwork"))


def _secret_problems(p: Path, text: str) -> list[str]:
    """Secrets by shape or by key, per line; a line that writes a file (``printf 'a = 1\\nb = 2'``) is
    also read per written line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = [line, *line.split("\\n")] if "\\n" in line else [line]
        if any(_SECRET_SHAPES.search(s) or redact_text(s) != s for s in parts):
            out.append(f"{p}:{n}: looks like a secret is written here")
            continue
        m = _SECRET_ASSIGN.search(line)
        if m and not _is_reference(m.group(2)):
            out.append(f"{p}:{n}: {m.group(1)} has a literal value; use a secret store or an env reference")
    return out


def _is_reference(value: str) -> bool:
    """``$VAR``, ``${VAR}``, ``$(VAR)``, ``valueFrom``-style or an obvious PLACEHOLDER is no secret."""
    return value.startswith("$") or value.isupper() or value in ("null", "~", "''", '""', "valueFrom")


# ---- one call for any file in cluster/ --------------------------------------------------------------------
def check_cluster_file(path: str | Path) -> dict[str, Any]:
    """Schema (Ray's, or the RayJob's required fields) + security rules; raises ``ClusterFileError``."""
    raw = load_cluster_file(path)
    config = validate_rayjob(path) if is_rayjob(raw) else validate_cluster_yaml(path)
    problems = security_problems(path)
    if problems:
        raise ClusterFileError("\n".join(problems))
    return config
