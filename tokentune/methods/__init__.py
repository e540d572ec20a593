"""Registered training methods. Importing this package registers every built-in method."""

from tokentune.methods import full, ist, lora, qlora, token_select  # noqa: F401  (registration side effects)
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
