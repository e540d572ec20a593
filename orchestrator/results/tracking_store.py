"""Is the sweep's tracking store there? Asked before a sweep writes anything (its folder, its lock,
``sweep.yaml``), so a tracking server that is down costs one clear line, not minutes of MLflow's retries,
and the same command (or ``--resume --set tracking.uri=...``) works once it is up.

Only a tracking *server* (``http://``, ``https://``) is asked, once, with a bounded timeout
(``CHECK_TIMEOUT_S``): any HTTP answer, even an error status, means it is up. A file or database store
(the default SQLite file in the sweep folder) is created where it is used.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from orchestrator.spec.parts import SpecError
from tokentune.redact import redact_text

CHECK_TIMEOUT_S = 10.0


def check_tracking_store(
    sweep_dir: str | Path, explicit: str | None, origin: str, timeout_s: float = CHECK_TIMEOUT_S
) -> str:
    """The sweep's tracking URI (``default_tracking_uri``); a ``SpecError`` naming it when it is a
    server that does not answer within ``timeout_s`` seconds."""
    from orchestrator.results.tracking import default_tracking_uri

    uri = default_tracking_uri(sweep_dir, explicit)
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return uri
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""  # user:password@ left out: MLflow takes them from env
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 - http(s) only, checked above
            return uri
    except urllib.error.HTTPError:  # it answered
        return uri
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise SpecError(
            "tracking.uri",
            f"the tracking server {redact_text(uri)} ({origin}) did not answer within {timeout_s:g} s "
            f"({redact_text(str(reason))}); nothing was written: start it, or give another with "
            "--set tracking.uri=... (also with --resume)",
        ) from None


def tracking_origin(explicit: str | None) -> str:
    """Where the sweep's tracking URI comes from (``default_tracking_uri``'s order), for messages."""
    if explicit:
        return "tracking.uri"
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return "from MLFLOW_TRACKING_URI"
    return "the default: a SQLite file in the sweep folder"
