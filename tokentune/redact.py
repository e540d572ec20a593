"""Redaction: the one pass every text and record goes through before it leaves the process.

What leaves: errors and tracebacks (``status.json``, ``eval.json``, MLflow tags and ``error.txt``), the
text files logged as MLflow artifacts, params and ``sweep.yaml`` (the sweep folder's and MLflow's), the
dry run's plan, and the results table (:func:`redact_rows`: results.csv/.json, the console table, the
Pareto labels, the summary logged to MLflow). Two rules, applied by :func:`redact` (records) and :func:`redact_text` (text):

- a key is secret by name (``HF_TOKEN``, ``*_token``, ``*secret*``, ``*password*``, ``AWS_*``,
  ``*api_key*``, ``*connection_string*``, ``*credential*``, ``*private_key``, ``sas``, ``sig`` ...):
  its value is masked whole, in a mapping and in text (``password=...``, ``"api_key": "..."``);
- a value is secret by shape: Hugging Face (``hf_...``), AWS key ids (``AKIA...``/``ASIA...``), GCP
  private keys (``-----BEGIN PRIVATE KEY-----``) and OAuth tokens (``ya29.``), Azure connection-string
  parts (``AccountKey=``, ``SharedAccessSignature=``), Databricks (``dapi...``), GitHub, OpenAI-style,
  Slack, JWTs, ``Bearer ...``; URL passwords (``scheme://user:pw@host``) and secret query parameters
  (``?sig=``, ``&token=``, ``X-Amz-Signature=`` ...) are masked in place.

References (``$VAR``, ``${VAR}``) and paths (``GOOGLE_APPLICATION_CREDENTIALS=/path``) are no secrets
and stay. Pure functions, no imports of ours (a leaf module of ``tokentune``, so the Ray-free CLI uses it
too); the orchestrator imports it for tracking, the trial files and the plan, and tools/cluster_check for the cluster files.
"""

from __future__ import annotations

import re
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REDACTED = "***"
#: files logged as artifacts that are read as text and redacted (others, e.g. weights, pass as they are)
TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".txt", ".log", ".csv", ".md", ".toml", ".cfg", ".ini")
MAX_TEXT_BYTES = 64 * 1024**2

_SECRET_KEY = re.compile(
    r"(^|[_\-.])(token|auth|authorization|bearer|secret|password|passwd|pwd|credentials?|sig|sas|"
    r"api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|secret[_\-]?key|session[_\-]?key|"
    r"account[_\-]?key|shared[_\-]?access[_\-]?key|signature)$"
    r"|secret|password|passwd|credential|^aws_|^hf_token$|api[_\-]?key|connection[_\-]?string"
    r"|(^|[_\-.])sas[_\-.]|sas[_\-]?token|private[_\-]?key$|accountkey|sharedaccess",
    re.IGNORECASE,
)
#: tokenizer settings that end in ``_token`` but are not secrets (also as a suffix: ``tokenizer_pad_token``)
_NOT_SECRET_KEYS = (
    "pad_token",
    "eos_token",
    "bos_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
)

# ---- secrets by shape, in the order they are applied ----------------------------------------------------
_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN[A-Z ]*PRIVATE KEY-----.*?(?:-----END[A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL
)
_AZURE_PART = re.compile(
    r"(?P<head>\b(?:AccountKey|SharedAccessKey|SharedAccessSignature|SharedSecret)=)(?P<val>[^;\s\"'<>]+)",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.\-]*://[^/\s:@]*:)(?P<pw>[^@/\s]+)(?P<at>@)")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?P<name>[\w.\-]*(?:token|sig|signature|key|secret|password|passwd|pwd|credentials?|auth))=)"
    r"(?P<val>[^&#;\s\"'<>]+)",
    re.IGNORECASE,
)
_SECRET_VALUE = re.compile(
    r"\bhf_[A-Za-z0-9]{16,}"  # Hugging Face
    r"|\b(?:AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key id
    r"|\bya29\.[\w\-.~+/]{10,}"  # Google OAuth access token
    r"|\bdapi[0-9a-f]{32}(?:-\d+)?"  # Databricks personal access token
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"  # GitHub
    r"|sk-[A-Za-z0-9_\-]{20,}"  # OpenAI-style
    r"|xox[abpr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|eyJ[\w\-]{10,}\.[\w\-]{10,}\.[\w\-]+"  # JWT
    r"|(?i:bearer)\s+[\w.\-~+/=]{16,}"
)
# key=value / key: value / "key": "value" in free text; the key decides (``is_secret_key``)
_ASSIGNMENT = re.compile(
    r"(?P<q>[\"'])(?P<qkey>[A-Za-z_][\w.\-]*)(?P=q)\s*[:=]\s*(?P<vq>[\"'])(?P<qval>[^\"'\n]*)(?P=vq)"
    r"|(?<![\w.\-])(?P<key>[A-Za-z_][\w.\-]*)\s*(?P<sep>=|:(?!//))[ \t]*(?P<val>[^\s\"',&)}\]]+)"
)
_REFERENCE = re.compile(r"^(\$|~/|/|\./|\*\*\*|<|\{\{)|^(null|none|~|true|false)$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """True for keys like ``HF_TOKEN``, ``hub.auth_token``, ``db_password``, ``AWS_SECRET_ACCESS_KEY``,
    ``AZURE_STORAGE_CONNECTION_STRING``, ``sas_token``, ``GCP_PRIVATE_KEY``."""
    leaf = str(key).rsplit(".", 1)[-1].lower()
    if leaf.endswith(_NOT_SECRET_KEYS):
        return False
    return bool(_SECRET_KEY.search(leaf)) or bool(re.search(r"(^|\.)aws_", str(key), re.IGNORECASE))


def redact_text(text: str) -> str:
    """Mask secrets inside free text (errors, tracebacks, URIs, file contents): by shape, in URLs and
    query strings, and after a key that names a secret."""
    if not text:
        return text
    text = _PRIVATE_KEY_BLOCK.sub(REDACTED, text)
    text = _AZURE_PART.sub(lambda m: m["head"] + REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED + m["at"], text)
    text = _QUERY_SECRET.sub(lambda m: m["head"] + REDACTED, text)
    text = _SECRET_VALUE.sub(REDACTED, text)
    return _ASSIGNMENT.sub(_mask_assignment, text)


def _mask_assignment(m: re.Match) -> str:
    key, value = (m["qkey"], m["qval"]) if m["qkey"] is not None else (m["key"], m["val"])
    start, end = (i - m.start() for i in m.span("qval" if m["qkey"] is not None else "val"))
    if is_secret_key(key):  # masked whole, unless a reference ($VAR) or a path
        inner = value if not value or _REFERENCE.search(value) else REDACTED
    else:  # another value may hold assignments itself ("error": "... password=x")
        inner = _ASSIGNMENT.sub(_mask_assignment, value)
    return m[0][:start] + inner + m[0][end:]


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` (nested or flat) with secret-looking keys and values masked as ``***``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_key(key) and value not in (None, ""):
            out[key] = REDACTED
        else:
            out[key] = redact_value(value)
    return out


def redact_value(value: Any) -> Any:
    """Any JSON-like value (mappings, lists, strings, numbers) with its secrets masked; a copy."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


def redact_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A table (a results table, a list of records) through :func:`redact`, row by row: what every writer
    and formatter of rows calls (results.csv/.json, the console table, the Pareto plot's labels, the
    table logged to MLflow), so a secret-shaped value (an ``hf_...`` folder in a searched path) is
    masked in each of them alike."""
    return [redact(row) for row in rows]


def unmasked(stored: Any, given: Any) -> Any:
    """``stored`` (a record written through :func:`redact`) with every masked value whose original is in
    ``given`` (the same record, as the user gave it again) put back: a value masked whole (``***``, by
    its key) takes ``given``'s, a value masked in place takes it when masking it gives ``stored``'s.
    Everything else, and every key only ``stored`` has, stays as stored. How a resumed sweep reads its
    redacted ``sweep.yaml``."""
    if isinstance(stored, Mapping) and isinstance(given, Mapping):
        return {k: unmasked(v, given[k]) if k in given else v for k, v in stored.items()}
    if isinstance(stored, list) and isinstance(given, (list, tuple)) and len(stored) == len(given):
        return [unmasked(s, g) for s, g in zip(stored, given)]
    if isinstance(stored, str) and REDACTED in stored and given not in (None, ""):
        if stored == REDACTED or redact_value(given) == stored:
            return given
    return stored


def secret_in_uri(uri: str) -> str | None:
    """What secret ``uri`` embeds (a password in its userinfo, a secret query parameter, a token), or
    None. Spec validation refuses such URIs: a URI is printed and stored in many places."""
    try:
        parts = urllib.parse.urlsplit(uri)
        password = parts.password
    except ValueError:
        return "a token" if redact_text(uri) != uri else None
    if password:
        return "a password in user:password@host"
    for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        probe = f"?{name}=x"
        if redact_text(probe) != probe:
            return f"the query parameter {name!r}"
    return "a token" if redact_text(uri) != uri else None


def redacted_file(path: Path, scratch: Path) -> Path:
    """``path`` itself, or (a text file that holds a secret) a redacted copy of it made in ``scratch``."""
    if path.suffix.lower() not in TEXT_SUFFIXES or path.stat().st_size > MAX_TEXT_BYTES:
        return path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return path
    safe = redact_text(text)
    if safe == text:
        return path
    copy = Path(tempfile.mkdtemp(dir=scratch)) / path.name
    copy.write_text(safe, encoding="utf-8")
    return copy
