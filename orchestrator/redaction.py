"""Redaction: secrets never reach the tracking store, logs or error tags.

A key is secret by name (``HF_TOKEN``, ``*_token``, ``*secret*``, ``*password*``, ``AWS_*``,
``*api_key*`` ...); a value is secret by shape (``hf_...``, ``AKIA...``, ``ghp_...``, ``sk-...``, JWTs,
``Bearer ...``); passwords inside URLs (``postgresql://user:pw@host``) are masked in place. Pure
functions, no imports of ours: MLflow tracking and the cluster checks both use them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

_SECRET_KEY = re.compile(
    r"(^|[_\-.])(token|auth|authorization|bearer|secret|password|passwd|pwd|credentials?|"
    r"api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|secret[_\-]?key|session[_\-]?key)$"
    r"|secret|password|passwd|credential|^aws_|^hf_token$|api[_\-]?key",
    re.IGNORECASE,
)
#: tokenizer settings that end in ``_token`` but are not secrets
_NOT_SECRET_KEYS = {
    "pad_token",
    "eos_token",
    "bos_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
}
_SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{16,}"  # Hugging Face
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"  # GitHub
    r"|sk-[A-Za-z0-9_\-]{20,}"  # OpenAI-style
    r"|xox[abpr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|eyJ[\w\-]{10,}\.[\w\-]{10,}\.[\w\-]+"  # JWT
    r"|(?i:bearer)\s+[\w.\-~+/=]{16,}"
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.\-]*://[^/\s:@]*:)(?P<pw>[^@/\s]+)(?P<at>@)")


def is_secret_key(key: str) -> bool:
    """True for keys like ``HF_TOKEN``, ``hub.auth_token``, ``db_password``, ``AWS_SECRET_ACCESS_KEY``."""
    leaf = str(key).rsplit(".", 1)[-1].lower()
    if leaf in _NOT_SECRET_KEYS:
        return False
    return bool(_SECRET_KEY.search(leaf)) or bool(re.search(r"(^|\.)aws_", str(key), re.IGNORECASE))


def redact_text(text: str) -> str:
    """Mask token-like substrings and URL passwords inside free text (error messages, values)."""
    text = _SECRET_VALUE.sub(REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED + m["at"], text)


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` (nested or flat) with secret-looking keys and values masked as ``***``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_key(key) and value not in (None, ""):
            out[key] = REDACTED
        elif isinstance(value, Mapping):
            out[key] = redact(value)
        elif isinstance(value, (list, tuple)):
            out[key] = [redact(v) if isinstance(v, Mapping) else _redact_value(v) for v in value]
        else:
            out[key] = _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    return redact_text(value) if isinstance(value, str) else value
