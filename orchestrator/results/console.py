"""What a sweep prints while it runs: one progress line per trial event and a heartbeat line.

    callback = SweepProgress(total=4, sweep_dir=...)     # a Ray Tune callback, in tune.RunConfig
    [12:03:04] trial 8995b_00001 finished (41 s): eval/score=0.61 | lora.rank=4 methods=lora
    [12:03:04] 2/4 trials done (2 finished), 2 running, 0 queued | elapsed 1m05s, ETA ~1m05s
    [12:03:34] 2/4 trials done (2 finished), 2 running (1 waiting for merge + eval), 0 queued | ...

A trial that Tune stopped early (ASHA, the time limit) is ``stopped``, not ``failed``: it has no
``status.json`` of its own (``orchestrator.results.trial_status``). The heartbeat repeats every
``every_s`` seconds while trials run. Ray's worker logs do not come here unless the sweep runs with
``--verbose`` (``log_to_driver``); they stay in Ray's log folder (:data:`RAY_LOGS`).

On ``--resume`` the trials that ended in an earlier run count as done ("24/24 trials done (23 before this
run, ...)") and the ETA is this run's pace over what is left.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ray.tune import Callback

from orchestrator.results.trial_status import last_event, read_status, trial_dir
from tokentune.redact import redact_text


def searched_text(searched: dict[str, Any], limit: int = 90) -> str:
    """``lora.rank=4 methods=lora+tokentune`` (searched values only, unset ones left out; lists joined by
    ``+``), redacted (``tokentune.redact``), cut to ``limit``."""
    parts = []
    for key, value in searched.items():
        if value is None or value == "":  # a searched key this trial's methods do not use
            continue
        if isinstance(value, (list, tuple)):
            value = "+".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    text = redact_text(" ".join(parts))  # before the cut: a cut secret would no longer match
    return text if len(text) <= limit else text[: limit - 3] + "..."


def duration(seconds: float) -> str:
    """``5s``, ``1m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


#: where Ray keeps a local session's worker logs (on every node of a cluster)
RAY_LOGS = "/tmp/ray/session_latest/logs"


class SweepProgress(Callback):
    """A Ray Tune callback that prints the sweep's progress (see the module docstring)."""

    def __init__(
        self,
        total: int,
        sweep_dir: str,
        objective: str | list[str],
        every_s: float = 30.0,
        out: TextIO | None = None,
    ) -> None:
        self.total, self.sweep_dir, self.objective, self.every_s = total, sweep_dir, objective, every_s
        self.out = out or sys.stdout
        self.t0 = time.monotonic()
        self.started: dict[str, float] = {}
        self.ended: dict[str, str] = {}  # trial id -> finished | skipped | failed | stopped
        self.earlier: dict[str, str] = {}  # the same, for trials that ended before this run (--resume)
        self.last_line = 0.0

    # ---- Tune hooks ----------------------------------------------------------------------------------
    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._note_earlier(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._note_earlier(trials)
        self.started.setdefault(trial.trial_id, time.monotonic())
        self._say(f"trial {trial.trial_id} started | {searched_text(_searched(trial.config))}")
        self._counts()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = read_status(trial_dir(self.sweep_dir, trial.trial_id)) or {}
        state = status.get("status") if status.get("status") in ("finished", "skipped") else "stopped"
        error = str(status.get("error") or "")[:120] if state == "skipped" else ""
        self._end(trial, state, {} if state == "skipped" else status.get("metrics") or {}, error)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = read_status(trial_dir(self.sweep_dir, trial.trial_id)) or {}
        self._end(trial, "failed", {}, str(status.get("error") or "")[:120])

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if len(self.started) > len(self.ended) and time.monotonic() - self.last_line >= self.every_s:
            self._counts()

    def _note_earlier(self, trials: list) -> None:
        """Trials Tune restored as ended (``--resume``) that this run never started."""
        for t in trials:
            tid, tune_state = getattr(t, "trial_id", None), getattr(t, "status", None)
            if tid in self.started or tid in self.earlier or tune_state not in ("TERMINATED", "ERROR"):
                continue
            if tune_state == "ERROR":
                self.earlier[tid] = "failed"
                continue
            status = (read_status(trial_dir(self.sweep_dir, tid)) or {}).get("status")
            self.earlier[tid] = status if status in ("finished", "skipped") else "stopped"

    # ---- lines ---------------------------------------------------------------------------------------
    def _end(self, trial: Any, state: str, metrics: dict[str, Any], error: str = "") -> None:
        if trial.trial_id in self.ended:
            return
        self.ended[trial.trial_id] = state
        took = time.monotonic() - self.started.get(trial.trial_id, self.t0)
        names = [self.objective] if isinstance(self.objective, str) else list(self.objective)  # a list: each
        scores = [(n, metrics.get(n)) for n in names if isinstance(metrics.get(n), (int, float))]
        what = ", ".join(f"{n}={v:.4g}" for n, v in scores) or error
        self._say(f"trial {trial.trial_id} {state} ({duration(took)})" + (f": {what}" if what else ""))
        self._counts()

    def _counts(self) -> None:
        now = len(self.ended)  # ended in this run: the ETA's pace
        done = now + len(self.earlier)
        running = len(self.started) - now
        queued = max(0, self.total - len(self.started) - len(self.earlier))
        merging = self._waiting_for_merge()
        ended = [*self.ended.values(), *self.earlier.values()]
        states = [s for s in ("finished", "skipped", "stopped", "failed") if s in ended]
        kinds = ", ".join(f"{sum(v == s for v in ended)} {s}" for s in states)
        if self.earlier:
            kinds = f"{len(self.earlier)} before this run, {kinds}"
        elapsed = time.monotonic() - self.t0
        eta = (
            f", ETA ~{duration(elapsed / now * (self.total - done))}" if 0 < now and done < self.total else ""
        )
        self._say(
            f"{done}/{self.total} trials done{f' ({kinds})' if kinds else ''}, {running} running"
            f"{f' ({merging} waiting for merge + eval)' if merging else ''}, {queued} queued | "
            f"elapsed {duration(elapsed)}{eta}"
        )

    def _waiting_for_merge(self) -> int:
        """Running trials whose last event is ``post-trial queued`` (the merge + eval pool's queue)."""
        running = [t for t in self.started if t not in self.ended]
        return sum(last_event(trial_dir(self.sweep_dir, t)) == "post-trial queued" for t in running)

    def _say(self, text: str) -> None:
        self.last_line = time.monotonic()
        print(f"[{time.strftime('%H:%M:%S')}] {redact_text(text)}", file=self.out, flush=True)


def _searched(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config of a trial as printed: a setup by its name."""
    from orchestrator.spec.parts import setup_name

    return {k: setup_name(v) or v for k, v in (config or {}).items() if not str(k).startswith("_")}
