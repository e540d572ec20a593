"""Redaction: the one pass every text and record goes through before it leaves the process.

The functions live in :mod:`tokentune.redact` (pure, no Ray or MLflow: the Ray-free ``tokentune`` CLI
redacts its console errors with them); this module is the orchestrator's name for them. See that
module for what is masked and why.
"""

from __future__ import annotations

from tokentune.redact import (
    MAX_TEXT_BYTES,
    REDACTED,
    TEXT_SUFFIXES,
    is_secret_key,
    redact,
    redact_text,
    redact_value,
    redacted_file,
    secret_in_uri,
)

__all__ = [
    "MAX_TEXT_BYTES",
    "REDACTED",
    "TEXT_SUFFIXES",
    "is_secret_key",
    "redact",
    "redact_text",
    "redact_value",
    "redacted_file",
    "secret_in_uri",
]
