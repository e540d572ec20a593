"""Registered training methods. Importing this package registers every built-in method."""

from tokentune.methods import full, ist, lora, qlora, token_select  # noqa: F401  (registration side effects)
from tokentune.methods.base import (
    REGISTRY,
    Method,
    NoConfig,
    StepContext,
    known_methods,
    register,
    validate_methods,
)
from tokentune.methods.stack import MethodStack

__all__ = [
    "REGISTRY",
    "Method",
    "MethodStack",
    "NoConfig",
    "StepContext",
    "known_methods",
    "register",
    "validate_methods",
]
