"""Tracking off Tune's event loop and never fatal (issue 28 item 3).

- the queue's mechanics with stand-in send functions (the queue is ours): puts never wait, writes are
  batched across steps, failed sends retried with backoff, what cannot be sent is recorded, the flush
  at the end is bounded;
- a real SQLite MLflow store: batched writes arrive complete and in order; a trial whose store is down
  records its writes and ``resend_pending`` (``--resume``) makes its run complete;
- MLflow's telemetry is off in every process that tracks, and in the Ray workers' environment;
- one real sweep (Ray, an ``mlflow server`` behind a proxy we switch off): every trial finishes with the
  store unreachable, and after ``--resume`` with the store back the runs are complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.results.tracking import SweepTracker
from orchestrator.results.tracking_journal import (
    DRIVER_PENDING_FILE,
    PENDING_FILE,
    DriverSender,
    TrialTracking,
    resend_pending,
)
from orchestrator.results.tracking_queue import TrackingQueue, Write, metrics_row, with_retries
from tests.conftest import free_port
from tokentune.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]


class Store:
    """A stand-in send function: records each call's rows; ``delay_s`` per call; the first ``fail``
    calls raise; ``block`` (an Event) holds every call until set."""

    def __init__(self, delay_s: float = 0.0, fail: int = 0, block: threading.Event | None = None):
        self.delay_s, self.fail, self.block = delay_s, fail, block
        self.calls: list[tuple[str, list[dict]]] = []
        self.tries = 0

    def __call__(self, trial_id: str, rows: list[dict]) -> None:
        self.tries += 1
        if self.block is not None:
            self.block.wait(60)
        time.sleep(self.delay_s)
        if self.tries <= self.fail:
            raise ConnectionError("store down")
        self.calls.append((trial_id, list(rows)))


def _steps(calls, trial_id: str) -> list[int]:
    return [r["step"] for t, rows in calls if t == trial_id for r in rows]


# ---- the queue, with stand-in send functions ------------------------------------------------------------------
def test_puts_never_wait_for_a_slow_store_and_writes_are_batched_across_steps():
    store, recorded = Store(delay_s=1.0), []
    q = TrackingQueue(store, lambda t, rows: recorded.append((t, rows)))
    t0 = time.perf_counter()
    for step in range(100):
        for trial in ("a", "b", "c"):
            q.put(Write(trial, metrics_row({"loss": 1.0 / (step + 1)}, step)))
    put_s = time.perf_counter() - t0
    assert put_s < 1.0, f"300 puts took {put_s:.2f} s: they waited on the store"  # one send alone is 1 s
    assert q.close(timeout_s=60) == 0 and recorded == []
    for trial in ("a", "b", "c"):
        assert _steps(store.calls, trial) == list(range(100))  # complete, in order
    # the first send takes what had queued (a write or a few), the rest waited together: one call per trial
    assert len(store.calls) <= 6, [len(rows) for _, rows in store.calls]


def test_failed_sends_are_retried_with_backoff():
    waits: list[float] = []
    flaky = Store(fail=3)
    assert with_retries(lambda: flaky("t", [{}]), 5, 0.5, 1.5, wait=waits.append) is None
    assert waits == [0.5, 1.0, 1.5] and flaky.tries == 4  # doubling, capped at max_backoff_s
    with pytest.raises(ConnectionError):
        with_retries(lambda: Store(fail=9)("t", [{}]), 2, 0.0, wait=waits.append)

    store = Store(fail=2)
    q = TrackingQueue(store, lambda t, rows: pytest.fail("nothing is lost"), attempts=3, backoff_s=0.01)
    q.put(Write("t", metrics_row({"loss": 1.0}, 1)))
    assert q.close(timeout_s=30) == 0
    assert store.tries == 3 and _steps(store.calls, "t") == [1]


def test_a_store_that_stays_down_gets_the_writes_recorded():
    """Every write is kept (recorded for --resume); once a send failed all its tries the store counts as
    down, and later sends are tried once each (a sweep's end does not wait out a backoff per batch)."""
    recorded: list[tuple[str, list[dict]]] = []
    store = Store(fail=10**6)
    q = TrackingQueue(store, lambda t, rows: recorded.append((t, rows)), attempts=3, backoff_s=0.01)
    q.put(Write("a", metrics_row({"loss": 1.0}, 0)))
    deadline = time.monotonic() + 30
    while not recorded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.tries == 3 and q.down
    q.put(Write("b", metrics_row({"loss": 1.0}, 1)))
    q.put(Write("c", {"op": "end", "status": "KILLED", "error": "stopped"}))
    assert q.close(timeout_s=30) == 3
    assert store.tries == 3 + 2
    rows = {t: rs for t, rs in recorded}
    assert rows["a"][0]["step"] == 0 and rows["b"][0]["step"] == 1 and rows["c"][0]["op"] == "end"
    assert "store down" in q.last_error


def test_the_flush_is_bounded_and_a_full_queue_records_instead_of_blocking():
    hold = threading.Event()
    store, recorded = Store(block=hold), []
    q = TrackingQueue(store, lambda t, rows: recorded.append((t, rows)), maxsize=3)
    q.put(Write("t", metrics_row({"loss": 1.0}, 0)))  # taken by the thread, held in the store
    time.sleep(0.5)
    accepted = [q.put(Write("t", metrics_row({"loss": 1.0}, s))) for s in range(1, 6)]
    assert accepted == [True, True, True, False, False]  # full: recorded, not waited on
    t0 = time.perf_counter()
    left = q.close(timeout_s=1.0)
    waited = time.perf_counter() - t0
    hold.set()
    assert waited < 10, f"close waited {waited:.1f} s on a hung store"
    assert left == 6  # the 2 overflows, the 3 queued and the one in flight (its send may never return)
    assert sorted(r["step"] for _, rs in recorded for r in rs) == [0, 1, 2, 3, 4, 5]


# ---- a real MLflow store ---------------------------------------------------------------------------------------
def test_batched_writes_arrive_complete_and_in_order(mlflow_store, tmp_path):
    uri, _ = mlflow_store
    tracker = SweepTracker(uri, "exp-queue", "s")
    tracker.start_parent({})
    finished = tracker.trial_run("done")
    tracker.end_trial(finished, "FINISHED")
    sender = DriverSender(SweepTracker(uri, "exp-queue", "s", parent_run_id=tracker.parent_run_id), tmp_path)
    q = TrackingQueue(sender, sender.record)
    for step in range(1, 61):
        for i, trial in enumerate(("t1", "t2")):
            q.put(
                Write(trial, metrics_row({"loss": 10.0 - step / 10 + i, "tokens_per_s": 100.0 + step}, step))
            )
    q.put(Write("done", metrics_row({"loss": 0.5}, 99)))  # a late write of a trial that ended
    q.put(Write("t2", {"op": "tags", "tags": {"tokentune.status": "stopped"}}))
    q.put(Write("t2", {"op": "end", "status": "KILLED", "error": "stopped early"}))
    assert q.close(timeout_s=120) == 0
    assert q.calls < 20, f"{q.calls} sends for 123 writes: not batched"

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for i, trial in enumerate(("t1", "t2")):
        run = client.get_run(sender.runs[trial])
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == list(range(1, 61)), trial
        assert [m.value for m in history] == pytest.approx([10.0 - s / 10 + i for s in range(1, 61)])
        assert len(client.get_metric_history(run.info.run_id, "tokens_per_s")) == 60
    t2 = client.get_run(sender.runs["t2"])
    assert t2.info.status == "KILLED" and t2.data.tags["tokentune.status"] == "stopped"
    assert client.get_run(sender.runs["t1"]).info.status == "RUNNING"
    assert client.get_run(finished).info.status == "FINISHED"  # a late write never reopens a run


def test_a_trial_whose_store_is_down_records_its_writes_and_resume_sends_them(
    mlflow_store, tmp_path, monkeypatch
):
    """The store refuses connections for the whole trial: every write is tried (3 times), then the
    trial goes offline, nothing raises, the writes wait in the trial folder; ``resend_pending`` (what
    ``--resume`` calls) makes the run complete: params, metrics with their steps, tags, status.json, end."""
    uri, _ = mlflow_store
    parent_tracker = SweepTracker(uri, "exp-offline", "s")
    parent = parent_tracker.start_parent({})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = SweepTracker(f"http://127.0.0.1:{free_port()}", "exp-offline", "s", parent_run_id=parent)
    tdir = tmp_path / "trials" / "t_0001"
    tdir.mkdir(parents=True)
    waits: list[float] = []
    tracking = TrialTracking(down, tdir, "t_0001", wait=waits.append)
    assert tracking.start({"lora": {"rank": 4}, "train": {"lr": 1e-3}}) is None and tracking.offline
    assert waits == [1.0, 2.0]  # three tries, then offline: later writes are recorded without trying
    tracking.tags({"tokentune.status": "running"})
    for step in (3, 6):
        tracking.metrics({"loss": 2.0 / step}, step)
    (tdir / "status.json").write_text(json.dumps({"status": "finished"}))
    tracking.artifacts()
    tracking.tags({"tokentune.status": "finished"})
    tracking.end("FINISHED")
    assert waits == [1.0, 2.0]
    ops = [r["op"] for r in read_jsonl(tdir / PENDING_FILE)]
    assert ops == ["params", "tags", "metrics", "metrics", "artifacts", "tags", "end"]
    events = [json.loads(line)["event"] for line in (tdir / "events.jsonl").read_text().splitlines()]
    assert events == ["tracking offline"]

    assert resend_pending(parent_tracker, tmp_path) == (1, 0)
    assert not (tdir / PENDING_FILE).exists()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([parent_tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert run.info.status == "FINISHED" and run.data.tags["tokentune.status"] == "finished"
    assert run.data.params["lora.rank"] == "4"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (3, pytest.approx(2 / 3)),
        (6, pytest.approx(1 / 3)),
    ]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["status.json"]
    assert resend_pending(parent_tracker, tmp_path) == (0, 0)  # sent once


def test_mlflow_telemetry_is_off_in_every_process_that_tracks():
    """MLflow 3 starts a telemetry thread at import unless told not to (an exception from it once failed
    trial processes). A process that imports our tracking first has it off; Ray's workers get the
    variable from the driver. The check runs outside pytest's environment (MLflow turns telemetry off by
    itself when it sees PYTEST_CURRENT_TEST or CI)."""
    from orchestrator.run.ray_cluster import worker_env

    code = (
        "import orchestrator.results.tracking, mlflow\n"
        "from mlflow.telemetry.client import get_telemetry_client\n"
        "print('client', get_telemetry_client())\n"
    )
    ci_vars = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
    env = {k: v for k, v in os.environ.items() if k not in ci_vars}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "client None" in out.stdout, out.stdout
    assert worker_env()["MLFLOW_DISABLE_TELEMETRY"] == "true"


# ---- a real sweep with the store unreachable ---------------------------------------------------------------
class SwitchableProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``target`` that becomes unreachable (each connection is
    closed unanswered) from the first request that mentions ``trigger`` until ``restore()``."""

    def __init__(self, target: str, trigger: str) -> None:
        import http.client
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy, host = self, urllib.parse.urlparse(target)
        self.down, self.refused, self.trigger = threading.Event(), 0, trigger.encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.trigger in body or proxy.trigger in urllib.parse.unquote(self.path).encode():
                    proxy.down.set()
                if proxy.down.is_set():
                    proxy.refused += 1
                    self.close_connection = True
                    return  # no answer: the client sees the connection closed
                conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
                skip = ("host", "connection", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def restore(self) -> None:
        self.trigger = b"\0never"
        self.down.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _events(tdir: Path) -> list[str]:
    return [r["event"] for r in read_jsonl(tdir / "events.jsonl")]


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_with_the_store_unreachable_finishes_and_resume_completes_its_runs(
    tmp_path, mlflow_tables, monkeypatch
):
    """Two tiny LoRA trials tracked through an ``mlflow server``; the store becomes unreachable from the
    first request about a trial run until the sweep has ended. Every trial finishes (tracking recorded
    in the trial folders), the sweep ends with its files; ``--resume`` with the store back sends what was
    recorded: each trial's run is complete (params, the loss curve's steps, final metrics, status.json,
    FINISHED) and the summary is logged on the parent."""
    import ray
    from mlflow import MlflowClient

    from orchestrator import run_sweep
    from tests.conftest import running_mlflow_server

    if ray.is_initialized():  # the sweep's Ray must start here, with this environment
        ray.shutdown()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retries only (MLflow's take minutes)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "server").mkdir()
    with running_mlflow_server(tmp_path / "server", mlflow_tables) as url:
        proxy = SwitchableProxy(url, trigger="tokentune.trial_id")
        spec = {
            "include": [str(REPO / "search_spaces" / "_base.yaml")],
            "name": "offline",
            "base": {"train": {"max_steps": 6, "batch_size": 8, "log_every": 2, "warmup_steps": 1}},
            "search": {"lora.rank": {"grid": [2, 4]}},
            "after_trial": {"action": "none"},
            "tracking": {"uri": proxy.url},
            "storage": str(tmp_path / "sweeps"),
        }
        try:
            res = run_sweep(spec, progress=False)
            assert proxy.down.is_set() and proxy.refused > 0
            assert [t.status for t in res.trials] == ["finished", "finished"], [t.error for t in res.trials]
            assert res.mlflow_compare_url is None and Path(res.results_csv).is_file()
            for t in res.trials:  # the trial's writes, and the driver's (the loss curve)
                assert (Path(t.trial_dir) / PENDING_FILE).is_file(), t.trial_id
                assert (Path(t.trial_dir) / DRIVER_PENDING_FILE).is_file(), t.trial_id
                assert "tracking offline" in _events(Path(t.trial_dir))
            proxy.restore()
            again = run_sweep(spec, resume=True, progress=False)
        finally:
            ray.shutdown()
            proxy.close()
        client = MlflowClient(url)
        parent = client.get_run(again.mlflow_parent_run_id)
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert parent.info.status == "FINISHED" and "results.csv" in parent.data.tags["mlflow.note.content"]
        assert "results.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
        assert again.mlflow_compare_url and len(children) == 2
        assert sorted(c.data.params["lora.rank"] for c in children) == ["2", "4"]
        for run in children:
            tdir = Path(again.sweep_dir) / "trials" / run.data.tags["tokentune.trial_id"]
            assert run.info.status == "FINISHED" and run.data.tags["tokentune.status"] == "finished"
            steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
            assert steps == [2, 4, 6], steps  # every report while the store was down
            assert "val_loss" in run.data.metrics and "memory/train_gb" in run.data.metrics
            assert "status.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
            assert not list(tdir.glob("tracking_pending*")) and "tracking re-sent" in _events(tdir)
