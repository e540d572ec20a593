"""Registered training methods. Importing this package registers every built-in method."""

from tokentune.methods import full, lora, qlora  # noqa: F401  (registration side effects)
from tokentune.methods.base import (
    REGISTRY,
    Method,
    NoConfig,
    StepContext,
    build_methods,
    known_methods,
    register,
    validate_methods,
)

for _optional in ("token_select", "ist"):
    try:
        __import__(f"tokentune.methods.{_optional}")
    except ModuleNotFoundError as _e:  # not written yet in this checkout
        if _e.name != f"tokentune.methods.{_optional}":
            raise

__all__ = [
    "REGISTRY",
    "Method",
    "NoConfig",
    "StepContext",
    "build_methods",
    "known_methods",
    "register",
    "validate_methods",
]
