"""The NetworkPolicy rule of a KubeRay manifest (``cluster/kuberay-rayjob.yaml``), checked offline.

    network_policy_problems(path, documents)   # [] when a NetworkPolicy guards the Ray pods

What must hold: some ``NetworkPolicy`` of the file selects every Ray pod of the RayJob (its podSelector
matches the head's and every worker group's template labels) with policy type Ingress; each of its
ingress rules admits only this Ray cluster's pods (a ``podSelector`` that requires the ``ray.io/cluster``
label KubeRay sets on every Ray pod, plus one label that only this RayJob's pods carry -- KubeRay names
a RayJob's cluster ``<job>-<random>``, so the cluster label's value is not known in advance); no
``namespaceSelector``, ``ipBlock`` or rule without ``from``; and the Ray ports (GCS, dashboard, client,
the worker port range when ``rayStartParams`` sets one) and MLflow's port are admitted from those pods (a
rule without ``ports`` admits every port). Labels under ``ray.io/`` are set by KubeRay at run time: a
selector on them is taken to match.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CLUSTER_LABEL = "ray.io/cluster"
#: Ray's fixed default ports (rayStartParams key -> default) and what they are
RAY_PORTS = {
    "port": (6379, "GCS"),
    "dashboard-port": (8265, "dashboard"),
    "ray-client-server-port": (10001, "client"),
}
MLFLOW_PORT = 5000
_MLFLOW_PORT_ARG = re.compile(r"mlflow\s+server\b[^\n;&|]*?--port[=\s]+(\d+)")


def network_policy_problems(path: str | Path, docs: list[dict[str, Any]]) -> list[str]:
    """Sentences naming the file for each broken NetworkPolicy rule of a KubeRay manifest (see module)."""
    p = Path(path)
    job = next((d for d in docs if d.get("kind") == "RayJob"), {})
    cluster = (job.get("spec") or {}).get("rayClusterSpec") or {}
    groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
    templates = [((g.get("template") or {}).get("metadata") or {}).get("labels") or {} for g in groups]
    needed = _needed_ports(groups, docs)
    policies = [
        d
        for d in docs
        if d.get("kind") == "NetworkPolicy"
        and all(_matches((d.get("spec") or {}).get("podSelector") or {}, t) for t in templates)
        and "Ingress" in ((d.get("spec") or {}).get("policyTypes") or ["Ingress"])
    ]
    ports_text = ", ".join(f"{what} {port}" for what, port in needed)
    if not policies:
        return [
            f"{p}: no NetworkPolicy (Ingress) selects every Ray pod: any pod of the Kubernetes cluster can "
            f"reach {ports_text}; add one that admits them only from this Ray cluster's pods (a podSelector "
            f"on {CLUSTER_LABEL} plus a label of this RayJob's pod templates; see cluster/kuberay-rayjob.yaml)"
        ]
    problems, admitted = [], []
    for pol in policies:
        name = (pol.get("metadata") or {}).get("name", "?")
        for i, rule in enumerate((pol.get("spec") or {}).get("ingress") or []):
            outside = [
                _describe(peer) for peer in rule.get("from") or [{}] if not _cluster_peer(peer, templates)
            ]
            if outside:
                problems.append(
                    f"{p}: NetworkPolicy {name!r}: ingress[{i}] admits {', '.join(outside)}, not only this "
                    f"Ray cluster's pods (podSelector on {CLUSTER_LABEL} + a label of this RayJob's pods)"
                )
            else:
                admitted.append(rule.get("ports"))
    for what, port in needed:
        if not any(_admits(ports, port, groups) for ports in admitted):
            problems.append(
                f"{p}: the NetworkPolicy does not admit {what} port {port} from this Ray cluster's pods"
            )
    return problems


def _needed_ports(groups: list[dict[str, Any]], docs: list[dict[str, Any]]) -> list[tuple[str, int | range]]:
    params = (groups[0].get("rayStartParams") or {}) if groups else {}
    out: list[tuple[str, int | range]] = [
        (f"Ray's {what}", int(params.get(key, default))) for key, (default, what) in RAY_PORTS.items()
    ]
    for g in groups:
        rp = g.get("rayStartParams") or {}
        if "min-worker-port" in rp and "max-worker-port" in rp:
            out.append(("Ray's worker", range(int(rp["min-worker-port"]), int(rp["max-worker-port"]) + 1)))
    text = "\n".join(strings_in(docs))
    if "mlflow server" in text or "mlflow ui" in text:
        m = _MLFLOW_PORT_ARG.search(text)
        out.append(("MLflow's", int(m.group(1)) if m else MLFLOW_PORT))
    return out


def _matches(selector: dict[str, Any], labels: dict[str, Any]) -> bool:
    """Whether a label selector selects a pod with these template labels (``ray.io/*``: taken to match)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if not str(key).startswith("ray.io/") and str(labels.get(key)) != str(value):
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = str(e.get("key", "")), e.get("operator"), [str(v) for v in e.get("values") or []]
        if key.startswith("ray.io/"):
            if op == "DoesNotExist":
                return False
            continue
        present, value = key in labels, str(labels.get(key))
        if (op == "In" and value not in values) or (op == "NotIn" and value in values):
            return False
        if (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def _cluster_peer(peer: dict[str, Any], templates: list[dict[str, Any]]) -> bool:
    """A ``from`` entry that admits this Ray cluster's pods and nothing else."""
    if set(peer) != {"podSelector"}:
        return False
    sel = peer["podSelector"] or {}
    labels = sel.get("matchLabels") or {}
    requires_cluster = CLUSTER_LABEL in labels or any(
        e.get("key") == CLUSTER_LABEL and e.get("operator") in ("Exists", "In")
        for e in sel.get("matchExpressions") or []
    )
    own = CLUSTER_LABEL in labels or any(not str(k).startswith("ray.io/") for k in labels)
    return requires_cluster and own and all(_matches(sel, t) for t in templates)


def _describe(peer: dict[str, Any]) -> str:
    if not peer:
        return "every source (a rule without `from`)"
    keys = [k for k in ("ipBlock", "namespaceSelector") if k in peer]
    return " + ".join(keys) if keys else f"pods {peer.get('podSelector')!r}"


def _admits(ports: list[dict[str, Any]] | None, port: int | range, groups: list[dict[str, Any]]) -> bool:
    if not ports:  # no `ports`: every port
        return True
    want = port if isinstance(port, range) else range(port, port + 1)
    named = {
        cp.get("name"): cp.get("containerPort")
        for g in groups
        for c in ((g.get("template") or {}).get("spec") or {}).get("containers") or []
        for cp in c.get("ports") or []
    }
    covered: set[int] = set()
    for entry in ports:
        first = entry.get("port")
        first = named.get(first, first) if isinstance(first, str) and not first.isdigit() else first
        if first is None:  # a protocol only: every port
            return True
        last = entry.get("endPort") or first
        covered.update(range(int(first), int(last) + 1))
    return all(n in covered for n in want)


def strings_in(obj: Any):
    """Every string inside a YAML value (mappings' values and lists, recursively)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)
