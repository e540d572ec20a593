"""The sweep orchestrator: Ray Tune over Ray Train jobs, merge + lm-eval per trial, MLflow tracking.

The only package that imports ray or mlflow, and only lazily: ``import orchestrator`` (and the CLI's
``--help``, and spec validation) never imports Ray.

    from orchestrator import run_sweep, load_spec
    spec = load_spec("search_spaces/quickstart.yaml")   # validated, no Ray
    result = run_sweep(spec)                            # SweepResult
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.api import run_sweep
    from orchestrator.results.types import SweepResult, TrialResult
    from orchestrator.spec.sweep import SpecError, SweepSpec, load_spec

_EXPORTS = {
    "run_sweep": "orchestrator.api",
    "SweepResult": "orchestrator.results.types",
    "TrialResult": "orchestrator.results.types",
    "SweepSpec": "orchestrator.spec.sweep",
    "SpecError": "orchestrator.spec.sweep",
    "load_spec": "orchestrator.spec.sweep",
}

__all__ = ["SpecError", "SweepResult", "SweepSpec", "TrialResult", "load_spec", "run_sweep"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
