"""How a sweep's costs grow with its trials and nodes: N microscopic trials on K local Ray nodes.

    python bench/sweep_scale.py --nodes 4 --trials 200       # the acceptance run
    python bench/sweep_scale.py --nodes 2 --trials 20 50     # several N, one cluster

The bench starts its own cluster: ``ray start`` of a head on 127.0.0.2 and K-1 nodes on 127.0.0.3...
(loopback only), each with ``--cpus-per-node`` CPUs and ``--memory-per-node-gb`` of Ray memory, a temp
folder of its own, token authentication on; every process of it carries a marker variable and is
stopped by pid at the end (also on an error or Ctrl-C; never ``ray stop``, which would stop every Ray of
this user on the machine). For each N, a fresh random-search sweep of the shipped tiny default
(``--steps`` steps, ``after_trial.action`` ``--after``, a tiny eval when it evaluates) runs through
``run_sweep`` against that cluster, then its ``--resume`` (a finished sweep: no work) is timed.

Per N it prints: trials finished / failed (and how many of those failures name tracking or the merge
queue); per-trial driver CPU seconds and RSS (each trial driver logs both with its ``logged`` event:
``orchestrator.run.trial.driver_usage``) over the first and the last 50 trials and whether they stay
within 25%; the peak RSS of a trial driver process and of a Ray Train controller (sampled every
second); GCS CPU seconds and peak RSS; Tune state and MLflow store sizes (per trial); the merge queue
wait (``phase/post_queued_s``, where the sweep records it); the event-loop stall (the sweep driver's
processing time of a Tune result minus the time the trial reported it: ``trial.REPORTED_AT``); Ray
Train worker shutdown (``phase/train_exit_s``); trial drivers per node; resume time; wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKER = "TOKENTUNE_BENCH_CLUSTER"
NODE_MARKER = "TOKENTUNE_BENCH_NODE"  # the node's address: which node a process runs on
BIN = Path(sys.executable).parent
FLAT = 0.25  # driver CPU/RSS per trial: the last 50 trials within 25% of the first 50
WINDOW = 50


# ---- the cluster -------------------------------------------------------------------------------------------
def _free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class LocalCluster:
    """K Ray nodes started with ``ray start`` on loopback addresses; stopped by the pids of our marker."""

    def __init__(self, root: Path, nodes: int, cpus: int, memory_gb: float):
        self.root, self.nodes, self.cpus, self.memory = root, nodes, cpus, int(memory_gb * 1024**3)
        self.id = uuid.uuid4().hex
        self.ips = [f"127.0.0.{2 + i}" for i in range(nodes)]
        self.token = root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.address = f"{self.ips[0]}:{_free_port(self.ips[0])}"

    def client_env(self) -> dict[str, str]:
        """What a client of this cluster needs (set in this process before ``run_sweep`` connects)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token), "RAY_ADDRESS": self.address}

    def _env(self, node: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", MARKER))}
        env.update({**self.client_env(), MARKER: self.id, NODE_MARKER: self.ips[node]})
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env["NO_PROXY"] = env["no_proxy"] = ",".join(["127.0.0.1", "localhost", *self.ips])
        return env

    def start(self) -> None:
        for i, ip in enumerate(self.ips):
            args = [f"--node-ip-address={ip}", f"--num-cpus={self.cpus}", "--num-gpus=0"]
            args += [f"--memory={self.memory}", "--object-store-memory=200000000", "--disable-usage-stats"]
            args += [f"--temp-dir={self.root / f'node{i}'}", f"--dashboard-agent-listen-port={_free_port()}"]
            if i == 0:
                args += ["--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=true"]
                args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}"]
                args += [f"--ray-client-server-port={_free_port()}"]
            else:
                args += [f"--address={self.address}"]
            self._start_node(i, args)

    def _start_node(self, i: int, args: list[str], attempts: int = 3) -> None:
        """``ray start`` of node ``i``; retried on a loaded machine (a raylet has 30 s to register)."""
        for attempt in range(1, attempts + 1):
            proc = subprocess.run(
                [str(BIN / "ray"), "start", *args],
                env=self._env(i),
                cwd=self.root,
                capture_output=True,
                text=True,
                timeout=300,
                start_new_session=True,
            )
            if proc.returncode == 0:
                return
            self.stop(node=self.ips[i])
            if attempt == attempts:
                raise RuntimeError(
                    f"ray start of node {i} ({self.ips[i]}) failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                )
            print(f"ray start of node {i} failed (attempt {attempt}); retrying", flush=True)

    def pids(self) -> dict[int, str]:
        """Our processes: pid -> the address of the node it runs on."""
        want, node = f"{MARKER}={self.id}".encode(), f"{NODE_MARKER}=".encode()
        out = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    env = (d / "environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if want in env:
                    out[int(d.name)] = next((e[len(node) :].decode() for e in env if e.startswith(node)), "?")
        return out

    def stop(self, grace_s: float = 15.0, node: str | None = None) -> None:
        """SIGTERM, then SIGKILL, our processes (of ``node``, an address, when given)."""

        def ours() -> list[int]:
            return [pid for pid, ip in self.pids().items() if node in (None, ip)]

        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            for pid in ours():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while time.time() < deadline and ours():
                time.sleep(0.5)


# ---- sampling the cluster's processes -----------------------------------------------------------------------
class ProcessSampler:
    """Every ``every_s``: the RSS of each of our processes by kind (trial driver, Train controller, GCS);
    peak RSS per kind, the GCS's CPU seconds, and the node of every process seen (``node_of``)."""

    KINDS = {"gcs": "gcs_server", "driver": "ImplicitFunc", "controller": "TrainController"}

    def __init__(self, cluster: LocalCluster, every_s: float = 1.0):
        self.cluster, self.every_s = cluster, every_s
        self.peak_mb: dict[str, float] = {}
        self.gcs_cpu_s = 0.0
        self.node_of: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._sample()  # the baseline (GCS CPU so far)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        import psutil

        pids = self.cluster.pids()
        self.node_of.update(pids)
        for pid in pids:
            try:
                p = psutil.Process(pid)
                text = " ".join(p.cmdline()) or p.name()
                kind = next((k for k, word in self.KINDS.items() if word in text), None)
                if kind is None:
                    continue
                rss = p.memory_info().rss / 1024**2
                self.peak_mb[kind] = max(self.peak_mb.get(kind, 0.0), rss)
                if kind == "gcs":
                    cpu = p.cpu_times()
                    self.gcs_cpu_s = cpu.user + cpu.system
            except (psutil.Error, OSError):
                continue


# ---- event-loop stall: the sweep driver's processing of a result vs its report ----------------------------
class StallClock:
    """Wraps ``TrialTrackingCallback.on_trial_result`` (the sweep driver's handler of every Tune result)
    to record, per result, the time it is processed minus the time the trial reported it."""

    def __init__(self) -> None:
        self.stalls: list[float] = []

    def __enter__(self) -> StallClock:
        from orchestrator.run import tuner
        from orchestrator.run.trial import REPORTED_AT

        self._cls = tuner.TrialTrackingCallback
        self._orig = original = self._cls.on_trial_result
        stalls = self.stalls

        def on_trial_result(cb, iteration, trials, trial, result, **info):
            if isinstance(result.get(REPORTED_AT), (int, float)):
                stalls.append(time.time() - result[REPORTED_AT])
            return original(cb, iteration, trials, trial, result, **info)

        self._cls.on_trial_result = on_trial_result
        return self

    def __exit__(self, *exc) -> None:
        self._cls.on_trial_result = self._orig


# ---- one sweep -----------------------------------------------------------------------------------------------
def spec_dict(args: argparse.Namespace, trials: int, storage: str) -> dict:
    after = {"action": args.after, "keep_merged": "none", "cpus": 0}
    driver = {"driver_memory_gb": args.driver_memory_gb} if args.driver_memory_gb else {}
    return {
        "include": [str(ROOT / "search_spaces" / "_base.yaml")],
        "name": f"scale_{trials}",
        "base": {
            "methods": ["lora"],
            "train": {"max_steps": args.steps, "log_every": 1, "batch_size": 4, "warmup_steps": 0},
            "data": {"max_length": 32},
            "eval": {"limit": args.eval_limit, "batch_size": 8},
        },
        "search": {"lora.rank": {"choice": [2, 4, 8]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
        "tune": {"algorithm": "random", "num_samples": trials, "seed": 0, **driver},
        "after_trial": after,
        "storage": storage,
    }


def _events(tdir: Path) -> list[dict]:
    path = tdir / "events.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def trial_usage(trials: list[dict], node_of: dict[int, str]) -> list[dict]:
    """Per finished trial (its ``status.json``, ``dir`` added), in the order they ended: its driver's node
    and pid, driver CPU s and RSS MB (the ``logged`` event), whether it was its driver process's first
    trial (``cold``: its imports), its Train worker's node (``node_of``: pid -> node) and its worker
    shutdown (``train_exit``)."""
    rows = []
    for t in trials:
        ev = {e.get("event"): e for e in _events(Path(t["dir"]))}  # the last of each
        logged, start = ev.get("logged", {}), ev.get("trial started", {})
        if "driver_cpu_s" in logged:
            worker = node_of.get(ev.get("workers_ready", {}).get("pid", -1), "?")
            exit_s = (t.get("metrics") or {}).get("phase/train_exit_s")
            rows.append(
                {**logged, "node": start.get("node", "?"), "worker_node": worker, "train_exit": exit_s}
            )
    rows.sort(key=lambda r: r["time"])
    seen: set[int] = set()
    for r in rows:
        r["cold"] = r["pid"] not in seen
        seen.add(r["pid"])
    return rows


def read_trials(sweep_dir: Path) -> list[dict]:
    """Every trial folder's ``status.json`` (``dir`` added): a sweep stopped midway is read too."""
    from orchestrator.results.trial_status import read_status

    out = []
    for d in sorted((sweep_dir / "trials").glob("*")):
        st = read_status(d)
        if st is not None:
            out.append({**st, "dir": str(d)})
    return out


def _size_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 1024**2
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024**2 if path.is_dir() else 0.0


def run_one(args: argparse.Namespace, trials: int, cluster: LocalCluster, storage: Path) -> dict:
    """One sweep of ``trials`` trials and its resume; on a signal (SIGTERM, Ctrl-C) what finished so far."""
    from orchestrator import run_sweep
    from orchestrator.run.interrupt import SweepInterrupted
    from orchestrator.spec.sweep import load_spec

    spec = load_spec(spec_dict(args, trials, str(storage)))
    sweep_dir, interrupted = storage / spec.name, False
    with ProcessSampler(cluster) as sampler, StallClock() as clock:
        gcs0 = sampler.gcs_cpu_s
        t0 = time.perf_counter()
        try:
            run_sweep(spec, address=cluster.address, progress=False)
        except SweepInterrupted:
            interrupted = True
        wall = time.perf_counter() - t0
        time.sleep(1.5)  # one more sample
    done = read_trials(sweep_dir)
    finished = [t for t in done if t.get("status") == "finished"]
    failed = [t for t in done if t.get("status") == "failed"]
    resume_s, resumed = float("nan"), 0
    if not interrupted:
        t1 = time.perf_counter()
        again = run_sweep(spec, address=cluster.address, progress=False, resume=True)
        resume_s = time.perf_counter() - t1
        resumed = sum(t.status == "finished" for t in again.trials)
    errors = [str(t.get("error") or "") for t in failed]
    return {
        "trials": trials,
        "interrupted": interrupted,
        "finished": len(finished),
        "failed": len(failed),
        "failed_tracking_or_queue": sum(
            any(w in e.lower() for w in ("mlflow", "tracking", "timed out", "queue")) for e in errors
        ),
        "errors": sorted({e[:160] for e in errors})[:3],
        "resumed_finished": resumed,
        "usage": trial_usage(finished, sampler.node_of),
        "peak_mb": dict(sampler.peak_mb),
        "gcs_cpu_s": sampler.gcs_cpu_s - gcs0,
        "tune_mb": _size_mb(sweep_dir / "tune"),
        "mlflow_mb": _size_mb(sweep_dir / "mlflow.db") + _size_mb(sweep_dir / "mlruns"),
        "queued": [
            t["metrics"]["phase/post_queued_s"] for t in finished if "phase/post_queued_s" in t["metrics"]
        ],
        "stalls": clock.stalls,
        "wall_s": wall,
        "resume_s": resume_s,
    }


# ---- the table ---------------------------------------------------------------------------------------------
def _stats(vals: list[float], unit: str = "s") -> str:
    if not vals:
        return "n/a"
    q = sorted(vals)
    p95 = q[min(len(q) - 1, int(0.95 * len(q)))]
    return f"median {statistics.median(q):.3g}{unit}, p95 {p95:.3g}{unit}, max {q[-1]:.3g}{unit}"


def flatness(usage: list[dict], key: str, window: int = WINDOW) -> tuple[float, float, bool]:
    """Mean of ``key`` over the first and the last ``window`` trials (a third of them when fewer than
    2 x ``window``) and whether the last stays within :data:`FLAT` of the first."""
    n = window if len(usage) >= 2 * window else max(1, len(usage) // 3)
    first = statistics.fmean(u[key] for u in usage[:n])
    last = statistics.fmean(u[key] for u in usage[-n:])
    return first, last, abs(last - first) <= FLAT * max(first, 1e-9)


def report(r: dict, nodes: int) -> tuple[str, bool]:
    """The table of one N and whether it passes (all finished, drivers on every node, flat usage)."""
    usage, n = r["usage"], r["trials"]
    per = max(1, r["finished"]) if r["interrupted"] else n  # per trial: of those that ran
    placement = Counter(u["node"] for u in usage)
    lines = [
        f"--- {n} trials on {nodes} nodes{' (INTERRUPTED: the trials finished so far)' if r['interrupted'] else ''} ---"
    ]
    row = lambda k, v: lines.append(f"{k:36s} {v}")  # noqa: E731
    row("finished / failed", f"{r['finished']}/{n} finished, {r['failed']} failed "
        f"({r['failed_tracking_or_queue']} by tracking or the merge queue)")  # fmt: skip
    ok = r["finished"] == n and len(placement) == nodes and not r["interrupted"]
    warm = [u for u in usage if not u["cold"]]  # a driver process's first trial also pays its imports
    cold = [u["driver_cpu_s"] for u in usage if u["cold"]]
    row("driver processes (cold start CPU)", f"{len(cold)} ({_stats(cold)})")
    for key, unit, label in (
        ("driver_cpu_s", "s", "driver CPU per trial (warm)"),
        ("driver_rss_mb", " MB", "driver RSS (warm)"),
    ):
        if warm:
            first, last, flat = flatness(warm, key)
            ok = ok and flat
            row(label, f"first {first:.3g}{unit}, last {last:.3g}{unit} ({'flat' if flat else 'NOT flat'} "
                f"within {FLAT:.0%}); {_stats([u[key] for u in warm], unit)}")  # fmt: skip
    peak = r["peak_mb"]
    row(
        "peak RSS driver / controller", f"{peak.get('driver', 0):.0f} MB / {peak.get('controller', 0):.0f} MB"
    )
    row(
        "GCS CPU / peak RSS",
        f"{r['gcs_cpu_s']:.1f} s ({r['gcs_cpu_s'] / per:.3f} s/trial) / {peak.get('gcs', 0):.0f} MB",
    )
    row("Tune state", f"{r['tune_mb']:.1f} MB ({r['tune_mb'] * 1024 / per:.0f} KB/trial)")
    row("MLflow store", f"{r['mlflow_mb']:.1f} MB ({r['mlflow_mb'] * 1024 / per:.0f} KB/trial)")
    row("merge queue wait", _stats(r["queued"]) if r["queued"] else "n/a (phase/post_queued_s not recorded)")
    row("event-loop stall (report->handled)", f"{_stats(r['stalls'])} over {len(r['stalls'])} results")
    for where, same in (("same node", True), ("across nodes", False)):
        exits = [
            u["train_exit"]
            for u in usage
            if u["train_exit"] is not None and (u["node"] == u["worker_node"]) == same
        ]
        row(f"Train worker shutdown, {where}", f"{_stats(exits)} ({len(exits)} trials)")
    row("trial drivers per node", ", ".join(f"{k}: {v}" for k, v in sorted(placement.items())))
    row("resume (finished sweep)", f"{r['resume_s']:.1f} s, {r['resumed_finished']}/{n} finished")
    row("wall", f"{r['wall_s']:.1f} s ({r['wall_s'] / per:.2f} s/trial)")
    for err in r["errors"]:
        row("error", err)
    lines.append(f"{'PASS' if ok else 'FAIL'}: all finished, drivers on every node, driver CPU/RSS flat")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="Ray nodes (the head + nodes-1), on 127.0.0.2...")
    p.add_argument("--trials", type=int, nargs="+", default=[50], help="one or more N: a sweep each")
    p.add_argument("--steps", type=int, default=2, help="training steps per trial")
    p.add_argument("--after", default="merge", help="after_trial.action: none, merge or merge+eval")
    p.add_argument("--eval-limit", type=int, default=4, help="eval.limit (examples per task) with merge+eval")
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--memory-per-node-gb", type=float, default=2.0, help="each node's Ray memory resource")
    p.add_argument(
        "--driver-memory-gb", type=float, help="tune.driver_memory_gb (default: its default); 0.25: before"
    )
    p.add_argument("--keep", action="store_true", help="keep the bench's folder (sweeps, Ray's logs)")
    p.add_argument("--json", help="also write the raw figures (per-trial rows included) to this file")
    p.add_argument("--from-json", help="print the tables of a run's --json file (no cluster started)")
    args = p.parse_args(argv)
    if args.from_json:
        tables = [report(r, args.nodes) for r in json.loads(Path(args.from_json).read_text())]
        print("\n".join(text for text, _ in tables))
        return 0 if all(ok for _, ok in tables) else 1
    if args.nodes < 1 or args.nodes > 250 or min(args.trials) < 1:
        p.error("--nodes must be 1..250 and every --trials >= 1")

    root = Path(tempfile.mkdtemp(prefix="sweep_scale_"))
    cluster = LocalCluster(root, args.nodes, args.cpus_per_node, args.memory_per_node_gb)
    results, ok = [], True
    t0 = time.perf_counter()
    try:
        cluster.start()
        os.environ.update(cluster.client_env())
        for n in args.trials:
            results.append(run_one(args, n, cluster, root / "sweeps"))
            if args.json:  # the raw figures first: report() can be rerun on them
                Path(args.json).write_text(json.dumps(results, indent=1))
            text, passed = report(results[-1], args.nodes)
            print(text, flush=True)
            ok = ok and passed
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
        if args.keep:
            print(f"kept {root} (Ray's logs: node*/session_latest/logs)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"bench wall {time.perf_counter() - t0:.1f} s (cluster start and stop included)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
