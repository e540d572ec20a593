"""SIGTERM and SIGINT to a sweep's driver stop the sweep cleanly, not an abort.

    with StopOnSignal() as stop:
        ray.init()                  # it installs its own SIGTERM handler:
        stop.install()              # take the signals back
        with stop.fitting():
            grid = tuner.fit()      # a signal here: Tune stops every trial and saves its state
        stop.raise_if_stopped()     # -> SweepInterrupted (the caller marks the parent run KILLED)

A first SIGTERM or SIGINT during ``tuner.fit()`` is handed to Ray Tune's own graceful stop (the handler
Tune installs for ``SIGUSR1``: the trials are stopped and the experiment state is saved, so ``--resume``
continues it); outside it, it raises ``SweepInterrupted`` at once. A second signal aborts
(``KeyboardInterrupt``). Tune's own SIGINT handler is switched off meanwhile
(``TUNE_DISABLE_SIGINT_HANDLER``), so both signals take this one path. Only in the main thread: elsewhere
signals cannot be caught and this does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


class SweepInterrupted(Exception):
    """The sweep was stopped by a signal; ``exit_code`` is the shell's ``128 + signal``."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}{': ' + detail if detail else ''}")


class StopOnSignal:
    """See the module docstring."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._in_fit = False
        self._saved: dict[int, Any] = {}
        self._env: str | None = None
        self._active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> StopOnSignal:
        if self._active:
            self._env = os.environ.get(TUNE_SIGINT_ENV)
            os.environ[TUNE_SIGINT_ENV] = "1"
            for s in SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def install(self) -> None:
        """Take the signals back: ``ray.init`` installs its own SIGTERM handler (it aborts the process)."""
        if self._active and self._saved:
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def __exit__(self, *exc: object) -> None:
        for s, old in self._saved.items():
            signal.signal(s, old)
        if self._active:
            if self._env is None:
                os.environ.pop(TUNE_SIGINT_ENV, None)
            else:
                os.environ[TUNE_SIGINT_ENV] = self._env

    @contextlib.contextmanager
    def fitting(self) -> Iterator[None]:
        """Mark the span of ``tuner.fit()``: a signal then stops Tune gracefully."""
        self._in_fit = True
        try:
            yield
        finally:
            self._in_fit = False

    def raise_if_stopped(self, detail: str = "") -> None:
        if self.signum is not None:
            raise SweepInterrupted(self.signum, detail)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: abort
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: aborted")
        self.signum = signum
        name = signal.Signals(signum).name
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if self._in_fit and callable(tune_stop):
            print(
                f"{name}: stopping the sweep (trials are stopped, the state is saved; --resume continues "
                "it); send it again to abort",
                file=sys.stderr,
                flush=True,
            )
            tune_stop(signal.SIGUSR1, frame)
            return
        raise SweepInterrupted(signum)


def close_running_children(tracker: Any, reason: str) -> int:
    """End every child run of the sweep's parent still RUNNING as KILLED (a resumed trial reopens its
    own); returns how many. Never raises: the sweep is stopping."""
    closed = 0
    try:
        for run_id in tracker.child_run_ids():
            if tracker.client.get_run(run_id).info.status == "RUNNING":
                tracker.set_tags(run_id, {"tokentune.status": "stopped"})
                tracker.end_trial(run_id, "KILLED", reason)
                closed += 1
    except Exception as err:  # noqa: BLE001 - a tracking error must not hide the stop
        print(f"warning: could not close the trial runs: {err}", file=sys.stderr)
    return closed
