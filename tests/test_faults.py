"""Fault injection on real processes (issue 16): ``kill -9`` of the sweep driver, of a Ray Train worker
and of the post-trial (merge + lm-eval) task at seeded random points, torn JSONL logs between runs, and
a full disk. Every sweep must end finished after a bounded number of ``--resume``s, with no finished
trial trained again, no MLflow run duplicated or reopened, and no checkpoint lost.

Nothing is mocked: each sweep is the ``tokentune sweep`` command on the shipped quickstart (shrunk with
``--set``), its own local Ray, MLflow on SQLite; faults come from this process (``SIGKILL`` to pids
found among the driver's descendants by their Ray process title, ``prlimit`` for the full disk).

    TOKENTUNE_FAULT_RUNS=30 pytest -s tests/test_faults.py     # more kill-and-resume cycles (default 10)
    TOKENTUNE_FAULT_SEED=7 ...                                 # another first seed (default 0)

Half-written state (issue 27): ``tokentune train`` runs that hit a seeded write limit (``ulimit -f``) while
writing their first checkpoint, then ``final/``, must start again and resume (a table of the runs with
``-s``); SIGTERM to a sweep driver stops it cleanly and ``--resume`` finishes it.

Figures: one line per cycle with ``-s``; all of them in ``<tmp>/fault_figures.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from tokentune.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"

FAULT_RUNS = int(os.environ.get("TOKENTUNE_FAULT_RUNS", "10"))  # kill-and-resume cycles in all
FIRST_SEED = int(os.environ.get("TOKENTUNE_FAULT_SEED", "0"))
TRIALS = 3  # lora.rank 2, 4, 8
MAX_STEPS = 12
SAVE_EVERY = 4
LOG_EVERY = 4
MAX_LAUNCHES = 12  # per episode: the first run and at most 11 resumes
LAUNCH_TIMEOUT_S = 400  # one run of the driver (a hang is a failure)
POLL_S = 0.2
TRAIN_WORKER = "ray::RayTrainWorker"
POST_TASK = "ray::PostTrialWorker.run"  # the sweep's warm merge + eval worker, while it serves a trial
KINDS = ("driver", "worker", "post")
DRIVER_PHASES = ("startup", "train", "post", "commit")


def sweep_args(storage: Path, name: str, ranks: list[int]) -> list[str]:
    """``tokentune sweep`` on the shipped quickstart, shrunk: LoRA only, one trial per rank, 12 steps
    with a checkpoint every 4, 16 documents per eval task, one trial at a time."""
    sets = [
        f"storage={storage}",
        "methods=[lora]",
        f"search.lora.rank={{grid: {ranks}}}",
        f"train.max_steps={MAX_STEPS}",
        "train.batch_size=8",
        f"train.save_every={SAVE_EVERY}",
        f"train.log_every={LOG_EVERY}",
        "train.warmup_steps=1",
        "eval.limit=16",
        "tune.max_concurrent=1",
    ]
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(QUICKSTART), "--name", name]
    for s in sets:
        cmd += ["--set", s]
    return cmd


# ---- processes ----------------------------------------------------------------------------------------
def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _title(p) -> str:
    try:
        return " ".join(p.cmdline()).strip()
    except Exception:  # noqa: BLE001 - gone, zombie or not ours
        return ""


def _ray_procs(root: int, title: str) -> list:
    """The driver's descendants whose Ray process title starts with ``title`` (never another sweep's)."""
    return [p for p in _descendants(root) if _title(p).startswith(title)]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group and every descendant (Ray's workers have their own groups)."""
    pids = [p.pid for p in _descendants(proc.pid)]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _alive_with_title(pid: int, title: str) -> bool:
    import psutil

    try:
        return _title(psutil.Process(pid)).startswith(title)
    except psutil.NoSuchProcess:
        return False


# ---- the sweep folder -----------------------------------------------------------------------------------
def _status(tdir: Path) -> dict:
    try:
        return json.loads((tdir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in (sweep_dir / "trials").glob("*") if p.is_dir())


def _train_starts(tdir: Path) -> int:
    return [r.get("event") for r in read_jsonl(tdir / "events.jsonl")].count("train started")


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _mlflow(sweep_dir: Path, name: str) -> dict:
    """Parent and child runs of the sweep's experiment (active and deleted), read from its SQLite file."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    if not (sweep_dir / "mlflow.db").is_file():  # killed before the driver made it
        return {"parents": [], "children": [], "deleted": 0}
    client = MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return {"parents": [], "children": [], "deleted": 0}
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    active = [r for r in runs if r.info.lifecycle_stage == "active"]
    return {
        "parents": [r for r in active if r.data.tags.get("tokentune.role") == "sweep"],
        "children": [r for r in active if r.data.tags.get("tokentune.role") == "trial"],
        "deleted": len(runs) - len(active),
    }


@dataclass
class Snapshot:
    """What a finished trial must keep from one driver run to the next."""

    train_starts: int
    adapter: str | None
    run_id: str | None
    run_end: int | None


def _snapshot(sweep_dir: Path, name: str) -> dict[str, Snapshot]:
    runs = {r.data.tags["tokentune.trial_id"]: r for r in _mlflow(sweep_dir, name)["children"]}
    out = {}
    for tdir in _trial_dirs(sweep_dir):
        if _status(tdir).get("status") != "finished":
            continue
        run = runs.get(tdir.name)
        out[tdir.name] = Snapshot(
            _train_starts(tdir),
            _digest(tdir / "final" / "adapter_model.safetensors"),
            run.info.run_id if run else None,
            run.info.end_time if run and run.info.status == "FINISHED" else None,
        )
    return out


def check_between_runs(sweep_dir: Path, name: str, before: dict[str, Snapshot]) -> dict[str, Snapshot]:
    """No MLflow run duplicated; every trial finished before is still finished, did not train again,
    kept its adapter bytes and its (closed) MLflow run. Returns the new snapshot."""
    ml = _mlflow(sweep_dir, name)
    assert len(ml["parents"]) <= 1, [p.info.run_id for p in ml["parents"]]
    ids = [c.data.tags["tokentune.trial_id"] for c in ml["children"]]
    assert len(ids) == len(set(ids)), f"duplicated MLflow child runs: {sorted(ids)}"
    if ml["parents"]:
        parent = ml["parents"][0].info.run_id
        assert all(c.data.tags.get("mlflow.parentRunId") == parent for c in ml["children"])
    now = _snapshot(sweep_dir, name)
    for tid, old in before.items():
        assert tid in now, (
            f"trial {tid} was finished and is not any more: {_status(sweep_dir / 'trials' / tid)}"
        )
        new = now[tid]
        assert new.train_starts == old.train_starts, f"finished trial {tid} trained again"
        assert new.adapter == old.adapter, f"finished trial {tid}: final adapter changed or lost"
        if old.run_id is not None:
            assert new.run_id == old.run_id, f"finished trial {tid}: MLflow run replaced"
        if old.run_end is not None:
            assert new.run_end == old.run_end, f"finished trial {tid}: its FINISHED MLflow run was reopened"
    return now


def check_finished_sweep(sweep_dir: Path, name: str, n_trials: int, torn: dict[str, list[dict]]) -> None:
    """The end state: every trial finished once in MLflow and in results.csv, adapters and checkpoints
    in place, the steps of every trial all trained."""
    trials = _trial_dirs(sweep_dir)
    assert len(trials) == n_trials, [t.name for t in trials]
    for tdir in trials:
        st = _status(tdir)
        assert st.get("status") == "finished", (tdir.name, st.get("error"))
        assert (tdir / "final" / "adapter_model.safetensors").is_file(), tdir.name
        assert (tdir / "eval.json").is_file() and "eval/score" in st["metrics"], tdir.name
        assert _train_starts(tdir) >= 1
        _check_checkpoints(sweep_dir / "train" / tdir.name)
        _check_steps(tdir, torn.get(str(tdir / "ray_reports.jsonl"), []))
    ml = _mlflow(sweep_dir, name)
    assert len(ml["parents"]) == 1 and ml["parents"][0].info.status == "FINISHED"
    children = {c.data.tags["tokentune.trial_id"]: c for c in ml["children"]}
    assert len(children) == len(ml["children"]) == n_trials, sorted(children)
    assert sorted(children) == [t.name for t in trials]
    for tid, run in children.items():
        assert run.info.status == "FINISHED", (tid, run.info.status)
        assert "eval/score" in run.data.metrics and run.data.tags.get("tokentune.status") == "finished"
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial_id"] for r in rows) == [t.name for t in trials]
    assert all(r["status"] == "finished" for r in rows), rows


def _check_checkpoints(run_dir: Path) -> None:
    """Every checkpoint Ray Train's manager lists is on disk and complete; the last is ``final``."""
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    names = [c["checkpoint_dir_name"] for c in snap["checkpoint_results"]]
    assert names and names[-1] == "final", names
    for n in names:
        d = run_dir / n
        if n == "final":
            done = json.loads((d / "done.json").read_text())
            assert done["max_steps"] == MAX_STEPS and done["metrics"]["step"] == MAX_STEPS
            assert (d / "final" / "adapter_model.safetensors").is_file()
        else:
            assert json.loads((d / "state.json").read_text())["step"] <= MAX_STEPS, n


def _check_steps(tdir: Path, torn: list[dict]) -> None:
    """Train reports, with the rows torn off put back: every attempt goes forward from a checkpoint
    step (0 or a multiple of save_every) no later than one checkpoint past what earlier attempts
    reported (a kill may land between a checkpoint and its row), and max_steps was reached."""
    rows = read_jsonl(tdir / "ray_reports.jsonl")
    for k, t in enumerate(torn):  # in tearing order: each row sat after the lines kept then
        rows.insert(t["line_index"] + k, t["row"])
    reached = 0
    for key in dict.fromkeys((r["launch"], r["attempt"]) for r in rows):
        steps = [r["step"] for r in rows if (r["launch"], r["attempt"]) == key and not r.get("finished")]
        if not steps:
            continue
        assert steps == sorted(steps), (tdir.name, key, steps)
        start = steps[0] - LOG_EVERY
        assert start % SAVE_EVERY == 0 and start <= reached + SAVE_EVERY, (tdir.name, key, reached, steps)
        reached = max(reached, steps[-1])
    assert reached == MAX_STEPS, (tdir.name, reached)


# ---- torn JSONL -----------------------------------------------------------------------------------------
def tear_jsonl(rng: random.Random, sweep_dir: Path) -> dict | None:
    """Cut the last line of one trial JSONL (events or Train reports) mid-line, as a killed writer
    would; returns what was cut (the row, to account for it) or None when there is no such file."""
    files = sorted(p for p in sweep_dir.glob("trials/*/*.jsonl") if p.stat().st_size > 0)
    if not files:
        return None
    path = rng.choice(files)
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        return {"file": str(path), "row": None, "already_torn": True}
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    last = data[start:].rstrip(b"\n")
    cut = start + rng.randint(1, max(1, len(last) - 1))
    path.write_bytes(data[:cut])
    lines = data[:start].count(b"\n")
    return {"file": str(path), "row": json.loads(last), "line_index": lines, "kept_bytes": cut - start}


# ---- one episode: a seeded sweep with kills, resumed until it finishes ---------------------------------
@dataclass
class Cycle:
    """One kill and what it took to recover."""

    seed: int
    index: int
    kind: str  # driver | worker | post
    phase: str  # when: startup | train | post | commit (driver); train (worker); post (post)
    delay_s: float
    launch: int = -1  # the driver run it hit (0 = the first)
    at_s: float | None = None  # seconds after that run started
    target: str = ""
    misses: int = 0  # armed, but the target was gone before the delay ended (re-armed)
    torn: dict | None = None  # the JSONL cut after a driver kill
    resumes_after: int = 0  # --resume runs the episode still needed after this kill
    outcome: str = "pending"


def draw_cycles(seed: int, n: int) -> list[Cycle]:
    """``n`` kills, the three kinds in turn (shuffled), each with a seeded phase and delay."""
    rng = random.Random(seed)
    kinds = [KINDS[i % 3] for i in range(n)]
    rng.shuffle(kinds)
    return [_arm(Cycle(seed, i, k, "", 0.0), rng) for i, k in enumerate(kinds)]


def _arm(c: Cycle, rng: random.Random) -> Cycle:
    c.phase = rng.choice(DRIVER_PHASES) if c.kind == "driver" else ("train" if c.kind == "worker" else "post")
    c.delay_s = round(
        {
            "startup": rng.uniform(2, 14),
            "train": rng.uniform(0.5, 9),
            "post": rng.uniform(0.05, 0.8),  # merge + eval of a trial takes ~1 s on the warm worker
            "commit": rng.uniform(0, 1.5),
        }[c.phase],
        2,
    )
    return c


@dataclass
class Launch:
    index: int
    resume: bool
    rc: int | None = None
    killed: bool = False
    wall_s: float = 0.0
    failed_trials: dict = field(default_factory=dict)
    train_retries: int = 0  # Ray Train restarts of a worker group in this run (after a worker kill)


class Episode:
    def __init__(self, tmp: Path, seed: int, cycles: list[Cycle], ranks: list[int]):
        self.seed, self.cycles, self.ranks = seed, cycles, ranks
        self.name = f"faults{seed}"
        self.storage = tmp / "sweeps"
        self.sweep_dir = self.storage / self.name
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(f"episode-{seed}")
        self.launches: list[Launch] = []
        self.torn: dict[str, list[dict]] = {}
        self.used_pids: set[int] = set()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(self) -> dict:
        t0 = time.time()
        before: dict[str, Snapshot] = {}
        while True:
            assert len(self.launches) < MAX_LAUNCHES, (
                f"seed {self.seed}: not finished after {MAX_LAUNCHES} runs"
            )
            launch = self._launch(resume=bool(self.launches))
            self.launches.append(launch)
            before = check_between_runs(self.sweep_dir, self.name, before)
            if not launch.killed and launch.rc == 0 and self._complete():
                break
        check_finished_sweep(self.sweep_dir, self.name, len(self.ranks), self.torn)
        last = len(self.launches) - 1
        for c in self.cycles:
            if c.launch >= 0:
                c.resumes_after = last - c.launch
                c.outcome = "finished"
        return {
            "seed": self.seed,
            "launches": [asdict(x) for x in self.launches],
            "resumes": last,
            "wall_s": round(time.time() - t0, 1),
        }

    def _complete(self) -> bool:
        dirs = _trial_dirs(self.sweep_dir)
        return len(dirs) == len(self.ranks) and all(_status(d).get("status") == "finished" for d in dirs)

    def _launch(self, resume: bool) -> Launch:
        launch = Launch(len(self.launches), resume)
        cmd = sweep_args(self.storage, self.name, self.ranks) + (["--resume"] if resume else [])
        log_path = self.logs / f"{self.name}_run{launch.index}.log"
        done_before = {d.name for d in _trial_dirs(self.sweep_dir) if _status(d).get("status") == "finished"}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
            )
            t0 = time.time()
            armed = fire_at = target = None
            armed_at = t0
            try:
                while proc.poll() is None:
                    if time.time() - t0 > LAUNCH_TIMEOUT_S:
                        raise AssertionError(f"seed {self.seed} run {launch.index} hung:\n{_tail(log_path)}")
                    pending = [c for c in self.cycles if c.launch < 0]
                    if armed is None and pending:
                        armed, fire_at, target, armed_at = pending[0], None, None, time.time()
                    if armed is not None and fire_at is None:
                        fire_at, target = self._trigger(armed, proc.pid, armed_at, done_before)
                    if armed is not None and fire_at is not None and time.time() >= fire_at:
                        if self._fire(armed, proc, target, t0, launch):
                            armed = None
                            if launch.killed:
                                break
                        else:  # the target ended first: re-arm with a new seeded delay
                            armed.misses += 1
                            _arm(armed, random.Random(f"{armed.seed}-{armed.index}-{armed.misses}"))
                            fire_at = None
                    time.sleep(POLL_S)
            except BaseException:
                _kill_tree(proc)
                raise
            if not launch.killed:
                launch.rc = proc.wait(timeout=120)
                # Ray's own processes may outlive a finished driver for a moment; nothing may survive
                _kill_tree(proc)
        launch.wall_s = round(time.time() - t0, 1)
        launch.train_retries = _tail(log_path, 10**8).count("[FailurePolicy] RETRY")
        launch.failed_trials = {
            d.name: str(_status(d).get("error"))[:160]
            for d in _trial_dirs(self.sweep_dir)
            if _status(d).get("status") == "failed"
        }
        if launch.killed:
            c = next(c for c in self.cycles if c.launch == launch.index and c.kind == "driver")
            c.torn = tear_jsonl(self.rng, self.sweep_dir)
            if c.torn and c.torn.get("row") is not None:
                self.torn.setdefault(c.torn["file"], []).append(c.torn)
        elif launch.rc != 0 and not launch.failed_trials:
            raise AssertionError(f"seed {self.seed} run {launch.index}: rc {launch.rc}\n{_tail(log_path)}")
        return launch

    def _trigger(self, c: Cycle, root: int, armed_at: float, done_before: set[str]):
        """(time to fire, target pid) once the cycle's phase is reached in this run, else (None, None).
        ``startup``: the delay counts from the start of the run, or from the previous kill in it."""
        if c.phase == "startup":
            return armed_at + c.delay_s, root
        if c.phase == "commit":
            fresh = [
                d
                for d in _trial_dirs(self.sweep_dir)
                if d.name not in done_before and _status(d).get("status") == "finished"
            ]
            if fresh:
                done_before.add(fresh[0].name)
                return time.time() + c.delay_s, root
            return None, None
        title = TRAIN_WORKER if c.phase == "train" else POST_TASK
        for p in _ray_procs(root, title):
            if p.pid not in self.used_pids:
                if title == TRAIN_WORKER:  # the post-trial worker's process serves every trial
                    self.used_pids.add(p.pid)
                return time.time() + c.delay_s, (root if c.kind == "driver" else p.pid)
        return None, None

    def _fire(self, c: Cycle, proc: subprocess.Popen, target: int, t0: float, launch: Launch) -> bool:
        title = {"worker": TRAIN_WORKER, "post": POST_TASK}.get(c.kind)
        if c.kind == "driver":
            if proc.poll() is not None:
                return False
            c.target = "driver process tree"
            _kill_tree(proc)
            launch.killed = True
        else:
            if not _alive_with_title(target, title):
                return False
            c.target = f"{title} pid {target}"
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                return False
        c.launch, c.at_s = launch.index, round(time.time() - t0, 1)
        return True


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _summary_line(c: Cycle) -> str:
    torn = ""
    if c.torn:
        torn = f" torn={Path(c.torn['file']).parent.name}/{Path(c.torn['file']).name}"
    return (
        f"seed={c.seed} cycle={c.index} kill={c.kind} phase={c.phase} delay={c.delay_s}s "
        f"run={c.launch} at={c.at_s}s misses={c.misses}{torn} -> {c.outcome}, "
        f"resumes after={c.resumes_after}"
    )


@pytest.mark.slow
@pytest.mark.ray
def test_seeded_kills_of_driver_worker_and_post_trial_always_resume(tmp_path):
    """Seeded episodes: a 3-trial sweep gets a sequence of ``kill -9``s (the driver's whole process
    tree, a Ray Train worker, the merge+eval task) at seeded points, each driver kill followed by a
    torn JSONL line; it is resumed until it finishes. Checked after every run and at the end (see
    ``check_between_runs``, ``check_finished_sweep``). Runs until FAULT_RUNS kills were delivered."""
    t0 = time.time()
    episodes, cycles = [], []
    seed = FIRST_SEED
    while sum(c.launch >= 0 for c in cycles) < FAULT_RUNS:
        assert seed - FIRST_SEED < FAULT_RUNS, "the kills never landed"
        left = FAULT_RUNS - sum(c.launch >= 0 for c in cycles)
        ep_cycles = draw_cycles(seed, left)
        ep = Episode(tmp_path / f"ep{seed}", seed, ep_cycles, ranks=[2, 4, 8][:TRIALS])
        episodes.append(ep.run())
        done = [c for c in ep_cycles if c.launch >= 0]
        for c in done:
            print(_summary_line(c), flush=True)
        cycles += done
        seed += 1
    by_kind = {k: sum(c.kind == k for c in cycles) for k in KINDS}
    figures = {
        "fault_runs": len(cycles),
        "kills_by_kind": by_kind,
        "episodes": episodes,
        "cycles": [asdict(c) for c in cycles],
        "outcomes": {o: sum(c.outcome == o for c in cycles) for o in {c.outcome for c in cycles}},
        "resumes_total": sum(e["resumes"] for e in episodes),
        "torn_jsonl": sum(1 for c in cycles if c.torn),
        "misses": sum(c.misses for c in cycles),
        "train_retries_in_run": sum(x["train_retries"] for e in episodes for x in e["launches"]),
        "wall_s": round(time.time() - t0, 1),
    }
    (tmp_path / "fault_figures.json").write_text(json.dumps(figures, indent=2, default=str))
    print(
        f"faults: {len(cycles)} kills {by_kind}, {len(episodes)} sweeps, {figures['resumes_total']} resumes, "
        f"{figures['torn_jsonl']} torn JSONL, outcomes {figures['outcomes']}, {figures['wall_s']}s "
        f"-> {tmp_path / 'fault_figures.json'}"
    )
    assert all(c.outcome == "finished" for c in cycles)
    assert all(by_kind[k] >= 1 for k in KINDS) or FAULT_RUNS < 3


# ---- a full disk -----------------------------------------------------------------------------------------
DISK_ERRORS = ("File too large", "Errno 27", "disk is full", "No space left", "EFBIG")


def _limit_writes(procs: list, limit: int) -> list[str]:
    """``prlimit(RLIMIT_FSIZE)`` on the running Python processes among ``procs``: past ``limit`` bytes
    every write to a file fails with EFBIG, an ``OSError`` (Python ignores SIGXFSZ). Ray's C++ daemons
    (GCS, raylet) are left alone: SIGXFSZ would kill them, which a full disk does not do. Returns the
    titles of the processes it reached."""
    import psutil

    done = []
    for p in procs:
        try:
            if "python" not in Path(p.exe()).name:
                continue
            p.rlimit(psutil.RLIMIT_FSIZE, (limit, limit))
            done.append(_title(p)[:40])
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            pass
    return done


def _reader(stream, sink: list[str]) -> threading.Thread:
    def pump():
        for line in iter(stream.readline, ""):
            sink.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


@pytest.mark.slow
@pytest.mark.ray
def test_full_disk_fails_clearly_and_resumes(tmp_path):
    """The disk fills up mid-sweep: a seeded time after the Train worker starts, every Python process
    of the sweep (the driver, the trial, the Train controller and worker, Ray's Python agents) gets
    RLIMIT_FSIZE 0, so any write that grows a file fails (EFBIG) as on a full disk. Limits: Ray's C++
    daemons are spared (SIGXFSZ would kill them), and processes Ray starts later do not inherit the
    limit. The run must end (no hang) with a disk error on record (console or a trial's status); once
    the disk has room again (a new run, no limit) ``--resume`` finishes the sweep with the invariants
    of the kill tests. The driver's console is a pipe (no size limit there), so its last words are
    kept. This test found the unreadable Ray Train snapshot (see the next test)."""
    rng = random.Random(FIRST_SEED)
    delay = round(rng.uniform(1, 4), 2)  # the worker loads for ~3 s, then trains 12 steps
    name, storage = "fulldisk", tmp_path / "sweeps"
    sweep_dir = storage / name
    cmd = sweep_args(storage, name, [2])  # one trial: the disk fills up while it trains
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    out: list[str] = []
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    reader = _reader(proc.stdout, out)
    limited_at = None
    limited: list[int] = []
    try:
        while proc.poll() is None and time.time() - t0 < LAUNCH_TIMEOUT_S:
            if limited_at is None and _ray_procs(proc.pid, TRAIN_WORKER):
                limited_at = time.time() + delay
            if limited_at is not None and not limited and time.time() >= limited_at:
                import psutil

                limited = _limit_writes([psutil.Process(proc.pid), *_descendants(proc.pid)], 0)
                full_at = time.time()
                deadline = full_at + 240
            if limited and time.time() > deadline:
                break
            time.sleep(POLL_S)
        hung = proc.poll() is None
    finally:
        _kill_tree(proc)
        reader.join(timeout=10)
    console = "".join(out)
    (tmp_path / "full_disk_run0.log").write_text(console)
    assert limited, f"the sweep ended before the disk filled up:\n{console[-3000:]}"
    assert not hung, f"a full disk hung the sweep (no exit 240 s after):\n{console[-3000:]}"
    statuses = {d.name: _status(d) for d in _trial_dirs(sweep_dir)}
    errors = [str(s.get("error")) for s in statuses.values() if s.get("status") == "failed"]
    where = [e for e in [console, *errors] if any(k in e for k in DISK_ERRORS)]
    assert proc.returncode != 0 or errors, "a sweep that hit a full disk reported success"
    assert where, f"no disk error on record (rc {proc.returncode}):\n{console[-3000:]}\n{errors}"
    first = {
        "delay_s": delay,
        "rc": proc.returncode,
        "limited_processes": sorted(limited),
        "ended_after_s": round(time.time() - full_at, 1),
        "failed_trials": {
            k: str(v.get("error"))[:200] for k, v in statuses.items() if v.get("status") == "failed"
        },
        "last_line": next(
            (ln for ln in reversed(console.splitlines()) if any(k in ln for k in DISK_ERRORS)), None
        ),
    }
    before = check_between_runs(sweep_dir, name, {})
    resumes = 0
    while True:  # the disk has room again
        resumes += 1
        assert resumes <= 3, "the sweep did not finish after 3 resumes once the disk had room"
        run = subprocess.run(
            cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        (tmp_path / f"full_disk_run{resumes}.log").write_text(run.stdout + run.stderr)
        before = check_between_runs(sweep_dir, name, before)
        if run.returncode == 0 and all(
            _status(d).get("status") == "finished" for d in _trial_dirs(sweep_dir)
        ):
            break
    check_finished_sweep(sweep_dir, name, 1, {})
    figures = {**first, "resumes": resumes, "wall_s": round(time.time() - t0, 1)}
    (tmp_path / "full_disk_figures.json").write_text(json.dumps(figures, indent=2))
    print(f"full disk: {figures}")


def test_unreadable_ray_train_snapshot_is_set_aside(tmp_path):
    """What the full-disk test found: Ray Train rewrites its checkpoint list in place, a full disk left
    it empty and every later start of that Train run failed. The driver now sets such a file aside."""
    from orchestrator.run.train_driver import RAY_SNAPSHOT, set_aside_unreadable_snapshot

    run = tmp_path / "run"
    run.mkdir()
    assert set_aside_unreadable_snapshot(str(tmp_path), "run") is None  # none there
    (run / RAY_SNAPSHOT).write_text('{"checkpoint_results": []}')
    assert set_aside_unreadable_snapshot(str(tmp_path), "run") is None  # readable: kept
    for torn in ("", '{"checkpoint_res'):
        (run / RAY_SNAPSHOT).write_text(torn)
        bad = set_aside_unreadable_snapshot(str(tmp_path), "run")
        assert bad is not None and bad.read_text() == torn and not (run / RAY_SNAPSHOT).exists()
        bad.unlink()
    assert set_aside_unreadable_snapshot("s3://bucket/x", "run") is None  # local storage only


# ---- half-written checkpoints and final/ (issue 27, item 4) -------------------------------------------
HALF_STEPS = 3  # checkpoints at steps 1 and 2, final/ after step 3
#: torch.save's zip writer reports a short write as its own error, not EFBIG
WRITE_ERRORS = (*DISK_ERRORS, "unexpected pos")


def _train_cmd(cfg_path: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "tokentune.cli", "train", str(cfg_path)] + (["--resume"] if resume else [])


def _run_limited(cmd: list[str], log: Path, static: int | None, armed: tuple[Path, int] | None) -> dict:
    """Run ``tokentune train``; ``static``: its RLIMIT_FSIZE from the start (``ulimit -f``); ``armed``:
    (file, bytes): that limit set on the running process once the file appears (a disk that fills up)."""
    import resource

    import psutil

    def preexec() -> None:
        if static is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (static, static))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0, limited_at = time.time(), None
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec
        )
        try:
            while proc.poll() is None:
                assert time.time() - t0 < LAUNCH_TIMEOUT_S, f"tokentune train hung:\n{_tail(log)}"
                if armed is not None and limited_at is None and armed[0].exists():
                    psutil.Process(proc.pid).rlimit(psutil.RLIMIT_FSIZE, (armed[1], armed[1]))
                    limited_at = round(time.time() - t0, 1)
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    return {"rc": proc.returncode, "limited_at_s": limited_at, "wall_s": round(time.time() - t0, 1)}


def _left(out: Path) -> str:
    """What a run left: its checkpoints and final/, each complete or not."""
    from tokentune.completeness import checkpoint_complete, final_complete

    parts = []
    for p in sorted(out.glob("checkpoint-*")) + sorted(out.glob("final*")):
        ok = final_complete(p) if p.name.startswith("final") else checkpoint_complete(p)
        parts.append(f"{p.name}({'complete' if ok else 'incomplete'})")
    return " ".join(parts) or "-"


@pytest.mark.slow
def test_runs_killed_while_writing_checkpoints_and_final_recover(tiny_workspace, tmp_path):
    """Seeded write limits on real ``tokentune train`` runs: (1) ``ulimit -f`` below the size of the first
    checkpoint's weights: the run dies writing its first checkpoint; a fresh start must then be accepted
    (before: "use --resume", and --resume found nothing). (2) the fresh run gets the limit once its last
    checkpoint is complete: it dies writing ``final/`` (before: "already holds a finished run"). (3)
    ``--resume`` continues from that checkpoint and finishes. Prints the table of runs and outcomes."""
    import yaml

    from tests.conftest import tiny_run_dict
    from tokentune.completeness import final_complete

    rng = random.Random(f"half-written-{FIRST_SEED}")
    out = tmp_path / "run"
    cfg = tiny_run_dict(tiny_workspace, ["lora"], out, train={"max_steps": HALF_STEPS, "save_every": 1})
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    first_limit = rng.randint(4_000, 60_000)  # > run_config.json (~1.5 kB), < the weights (~110 kB)
    final_limit = rng.randint(1_000, 60_000)  # < the adapter (~100 kB); final/README.md (~5 kB) may fit
    runs = [
        ("fresh", f"ulimit -f {first_limit} B", _train_cmd(cfg_path, False), first_limit, None),
        ("fresh", f"limit {final_limit} B at ckpt 2", _train_cmd(cfg_path, False), None,
         (out / "checkpoint-000002" / "state.json", final_limit)),
        ("--resume", "none", _train_cmd(cfg_path, True), None, None),
    ]  # fmt: skip
    table = []
    for i, (mode, fault, cmd, static, armed) in enumerate(runs):
        log = tmp_path / f"train{i}.log"
        got = _run_limited(cmd, log, static, armed)
        table.append({"run": i, "mode": mode, "fault": fault, **got, "left": _left(out)})
        text = _tail(log, 10**6)
        assert "use --resume" not in text and "already holds" not in text, f"run {i} refused:\n{text[-3000:]}"
        if i < 2:
            assert got["rc"] != 0 and any(k in text for k in WRITE_ERRORS), (
                f"run {i}: no write error\n{text[-2000:]}"
            )
    assert (out / "checkpoint-000001.incomplete").is_dir()  # run 0's, set aside by run 1
    assert any(p.name.startswith("final.incomplete") for p in out.iterdir())  # run 1's, set aside by run 2
    assert table[2]["rc"] == 0 and final_complete(out / "final") and (out / "result.json").is_file()
    print(f"\nhalf-written runs (seed {FIRST_SEED}):")
    print(f"{'run':>3}  {'mode':9} {'fault':28} {'rc':>3} {'wall_s':>6}  left")
    for r in table:
        print(f"{r['run']:>3}  {r['mode']:9} {r['fault']:28} {r['rc']:>3} {r['wall_s']:>6}  {r['left']}")
    (tmp_path / "half_written_figures.json").write_text(json.dumps(table, indent=2))


# ---- SIGTERM to the sweep driver (issue 27, item 8) -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_stops_the_sweep_cleanly_and_resume_finishes_it(tmp_path):
    """SIGTERM to a real ``tokentune sweep`` driver once its first trial finished and the second trains:
    the driver stops the trials, marks the parent run KILLED (no run left RUNNING), says so in one line
    and exits 143; ``--resume`` finishes the sweep without training the finished trial again."""
    name, storage = "sigterm", tmp_path / "sweeps"
    sweep_dir = storage / name
    cmd = sweep_args(storage, name, [2, 4])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "sigterm_run0.log"
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
        sent = None
        try:
            while proc.poll() is None and time.time() - t0 < LAUNCH_TIMEOUT_S:
                dirs = _trial_dirs(sweep_dir)
                done = [d for d in dirs if _status(d).get("status") == "finished"]
                training = [d for d in dirs if d not in done and _train_starts(d) >= 1]
                if sent is None and done and training:
                    proc.send_signal(signal.SIGTERM)
                    sent = time.time()
                if sent is not None:
                    break
                time.sleep(POLL_S)
            rc = proc.wait(timeout=180)
        finally:
            _kill_tree(proc)
    console = _tail(log, 10**6)
    assert sent is not None, f"the sweep ended before the signal:\n{console[-3000:]}"
    stop_s = round(time.time() - sent, 1)
    assert rc == 143, f"rc {rc}:\n{console[-3000:]}"
    assert "sweep stopped by SIGTERM: resume it with --resume" in console, console[-2000:]
    ml = _mlflow(sweep_dir, name)
    assert [p.info.status for p in ml["parents"]] == ["KILLED"]
    assert all(c.info.status != "RUNNING" for c in ml["children"]), [c.info.status for c in ml["children"]]
    before = check_between_runs(sweep_dir, name, {})
    assert len(before) == 1
    run = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "sigterm_run1.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    check_between_runs(sweep_dir, name, before)
    check_finished_sweep(sweep_dir, name, 2, {})
    print(f"\nsigterm: stopped {stop_s}s after the signal (rc {rc}); one --resume finished the sweep")
