"""No secret leaves a sweep: one table of secret shapes (Hugging Face, AWS, GCP, Azure, Databricks, URL
userinfo, query tokens) goes through every output path (``status.json`` and ``events.jsonl``,
``eval.json``, the results' ``error`` column, the dry-run plan, MLflow tags, ``error.txt`` and text
artifacts), and nowhere does the secret come out. Credentials inside ``tracking.uri``, ``storage`` or the
``MLFLOW_TRACKING_URI`` a sweep would use are refused, naming the key and never echoing the secret; the
console errors of both CLIs are redacted."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.spec.sweep import SpecError, load_spec
from tokentune.redact import REDACTED, is_secret_key, redact, redact_text

# provider -> (the secret, how it shows up in an error message or a file)
SECRETS = {
    "huggingface": (
        "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
        "401 Client Error: Unauthorized for url https://huggingface.co/api/models/x (token {s})",
    ),
    "aws_key_id": (
        "AKIA" + "Z7QWERTYUIOPASDF",
        "InvalidAccessKeyId: the AWS Access Key Id {s} does not exist",
    ),
    "aws_secret": (
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
        "botocore config [default]\naws_secret_access_key = {s}\nregion = us-east-1",
    ),
    "aws_presigned": (
        "fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024",
        "403 for https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={s}&X-Amz-Date=1",
    ),
    "gcp_private_key": (
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7",
        '{{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\n{s}\\n'
        '-----END PRIVATE KEY-----\\n", "client_email": "sa@p.iam.gserviceaccount.com"}}',
    ),
    "gcp_oauth": ("ya29." + "a0AfH6SMBx7lKq1mNoPqRsTuVwXyZ", "google.auth: token {s} expired"),
    "azure_account_key": (
        "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg==",
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={s};EndpointSuffix=core.windows.net",
    ),
    "azure_connection_string": (
        "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=2022-11-02&sig=Qk9PTQ",
        "AZURE_STORAGE_CONNECTION_STRING={s}",
    ),
    "azure_sas": (
        "0K1l2M3n4O5p6Q7r8S9t%2BuVwX%3D",
        "AuthenticationFailed: GET https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig={s}",
    ),
    "databricks": ("dapi" + "0123456789abcdef0123456789abcdef", "Databricks: invalid access token {s}"),
    "url_userinfo": ("Pa55w0rd-Xyz", "could not connect to postgresql://mlflow:{s}@db.internal:5432/mlflow"),
    "query_token": (
        "QtOkEn-123456789",
        "GET https://mlflow.example.com/api/2.0/runs?access_token={s}&x=1 failed",
    ),
}
TEXTS = {name: text.format(s=secret) for name, (secret, text) in SECRETS.items()}
ALL_TEXT = "\n".join(TEXTS.values())


def assert_no_secret(produced: str, where: str) -> None:
    for name, (secret, _) in SECRETS.items():
        assert secret not in produced, f"{name} secret leaks through {where}"


def _secret_error() -> RuntimeError:
    try:
        raise RuntimeError(ALL_TEXT)
    except RuntimeError as err:
        return err


def test_redact_text_masks_every_shape():
    for name, (secret, _) in SECRETS.items():
        out = redact_text(f"note: {TEXTS[name]} ({name})")
        assert secret not in out and REDACTED in out, f"{name}: {out}"
        assert out.startswith("note: ") and out.endswith(f"({name})")  # the text around it stays


def test_key_names_and_what_stays():
    for key in (
        "AZURE_STORAGE_CONNECTION_STRING",
        "sas_token",
        "SAS",
        "GCP_PRIVATE_KEY",
        "db_credential",
        "sig",
    ):
        assert is_secret_key(key), key
    for key in ("tokenizer_pad_token", "tokens_per_s", "tokentune.ratio", "max_new_tokens", "author"):
        assert not is_secret_key(key), key
    assert redact({"env": {"AZURE_STORAGE_CONNECTION_STRING": "x"}}) == {
        "env": {"AZURE_STORAGE_CONNECTION_STRING": REDACTED}
    }
    kept = "AWS_SECRET_ACCESS_KEY=${AWS_SECRET} GOOGLE_APPLICATION_CREDENTIALS=/keys/sa.json pad_token: <pad>"
    assert redact_text(kept) == kept  # references, paths and tokenizer settings are no secrets


# ---- every output path ----------------------------------------------------------------------------------
def test_status_json_and_events(tmp_path):
    from orchestrator.results.trial_status import EVENTS_FILE, STATUS_FILE, log_event, write_status

    err = _secret_error()
    write_status(
        tmp_path,
        "failed",
        error=f"{type(err).__name__}: {err}",
        traceback=ALL_TEXT,
        config={"hub": {"token": SECRETS["huggingface"][0]}, "data.train": TEXTS["azure_sas"]},
    )
    log_event(tmp_path, "train failed", detail=ALL_TEXT)
    for name in (STATUS_FILE, EVENTS_FILE):
        assert_no_secret((tmp_path / name).read_text(), name)
    status = json.loads((tmp_path / STATUS_FILE).read_text())
    assert status["status"] == "failed" and "AWS Access Key Id" in status["error"]  # the message stays


def test_eval_json_error_and_traceback(tmp_path, monkeypatch):
    import tokentune.evaluate
    from orchestrator.run.post_trial import merge_and_evaluate

    def failing_merge(*args, **kwargs):
        raise _secret_error()

    monkeypatch.setattr(tokentune.evaluate, "prepare_checkpoint", failing_merge)
    out = merge_and_evaluate(tmp_path / "final", tmp_path / "trial", {"tasks": ["tt_next"]})
    assert out["error"].startswith("merge failed: RuntimeError")
    assert_no_secret(out["error"], "the post-trial result")
    saved = (tmp_path / "trial" / "eval.json").read_text()
    assert "Traceback" in json.loads(saved)["traceback"]
    assert_no_secret(saved, "eval.json")


def test_results_error_column(tmp_path):
    from orchestrator.results import report

    trials = [
        {"trial_id": f"t{i}", "status": "failed", "searched": {"lora.rank": 4}, "error": text}
        for i, text in enumerate(TEXTS.values())
    ]
    rows = report.results_table(trials, search_keys=["lora.rank"])
    assert all(r["error"] for r in rows)
    csv_path = report.write_csv(rows, tmp_path / "results.csv")
    json_path = report.write_json(rows, tmp_path / "results.json")
    for path in (csv_path, json_path):
        assert_no_secret(Path(path).read_text(), path.name)
    assert_no_secret(report.format_table(rows), "the console table")


def test_collected_trial_errors(tmp_path):
    """Errors the tuner collects: from status.json (an older, unredacted one) and from Tune itself."""
    from orchestrator.run.tuner import collect_trials

    spec = load_spec({"name": "s", "base": {"train": {"max_steps": 2}}})
    (tmp_path / "trials" / "a").mkdir(parents=True)
    (tmp_path / "trials" / "a" / "status.json").write_text(
        json.dumps({"status": "failed", "error": ALL_TEXT})
    )
    tune_trials = [
        SimpleNamespace(trial_id="a", config={}, last_result={}, status="ERROR", error_msg=None),
        SimpleNamespace(trial_id="b", config={}, last_result={}, status="ERROR", error_msg=ALL_TEXT),
    ]
    grid = SimpleNamespace(_experiment_analysis=SimpleNamespace(trials=tune_trials))
    results = collect_trials(grid, spec, tmp_path)
    assert [r.status for r in results] == ["failed", "failed"]
    for r in results:
        assert r.error and "AWS Access Key Id" in r.error
        assert_no_secret(r.error, f"the error of trial {r.trial_id}")


def test_dry_run_plan(tmp_path):
    """A searched value that quotes a secret (here data.train, inputs unchecked) never reaches the plan."""
    from orchestrator.api import run_sweep

    d = {
        "name": "plan",
        "base": {"train": {"max_steps": 2}},
        "search": {"data.train": {"grid": list(TEXTS.values())}},
        "storage": str(tmp_path),
    }
    spec = load_spec(d, check_inputs=False)
    assert_no_secret(spec.plan_text(), "SweepSpec.plan_text")
    res = run_sweep(spec, dry_run=True, progress=False)
    assert res.plan_text and "data.train" in res.plan_text
    assert_no_secret(res.plan_text, "run_sweep(dry_run=True).plan_text")


@pytest.fixture(scope="module")
def tracker(mlflow_store):
    from orchestrator.results.tracking import SweepTracker

    uri, root = mlflow_store
    return SweepTracker(uri, "secrets", "secrets"), root


def test_mlflow_error_tags_and_artifacts(tracker):
    from orchestrator.results.tracking import TAG_ERROR

    tr, root = tracker
    run_id = tr.trial_run("t_secret", {"lora": {"rank": 4}})
    artifact = root / "run_config.json"  # a text file as the trial logs it (e.g. run_config.json)
    artifact.write_text(json.dumps({"error": ALL_TEXT, "data": {"train": TEXTS["azure_sas"]}}))
    folder = root / "final"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.txt").write_text(ALL_TEXT)
    tr.log_artifact(run_id, artifact)
    tr.log_artifact(run_id, folder, "final")
    tr.set_tags(run_id, {"tokentune.detail": ALL_TEXT})
    tr.end_trial(run_id, "FAILED", ALL_TEXT)

    run = tr.client.get_run(run_id)
    assert run.info.status == "FAILED" and "AWS Access Key Id" in run.data.tags[TAG_ERROR]
    for key, value in run.data.tags.items():
        assert_no_secret(value, f"the tag {key}")
    out = root / "downloaded"
    out.mkdir()
    for path in ("error.txt", "run_config.json", "final/sub/notes.txt"):
        local = Path(tr.client.download_artifacts(run_id, path, str(out)))
        assert_no_secret(local.read_text(), f"the artifact {path}")
    assert json.loads((out / "run_config.json").read_text())["data"]["train"].endswith(f"sig={REDACTED}")


# ---- credentials in tracking.uri / storage are refused ------------------------------------------------
@pytest.mark.parametrize(
    "key,value,secret",
    [
        ("tracking.uri", "https://alice:Pa55w0rd-Xyz@mlflow.example.com", "Pa55w0rd-Xyz"),
        ("tracking.uri", "postgresql://mlflow:Pa55w0rd-Xyz@db:5432/mlflow", "Pa55w0rd-Xyz"),
        ("tracking.uri", "https://mlflow.example.com/?access_token=QtOkEn-123456789", "QtOkEn-123456789"),
        ("tracking.uri", "databricks://dapi0123456789abcdef0123456789abcdef@host", "dapi0123456789abcdef"),
        ("storage", "s3://bucket/sweeps?X-Amz-Credential=AKIAZ7QWERTYUIOPASDF", "AKIAZ7QWERTYUIOPASDF"),
        ("storage", "abfs://c@acct.dfs.core.windows.net/sweeps?sv=2022&sig=0K1l2M3n4O5p", "0K1l2M3n4O5p"),
        ("storage", "https://user:Pa55w0rd-Xyz@storage.example.com/bucket", "Pa55w0rd-Xyz"),
        ("storage", "gs://bucket/sweeps?token=ya29.a0AfH6SMBx7lKq1mNoPq", "ya29.a0AfH6SMBx7lKq1mNoPq"),
    ],
)
def test_credentials_in_uris_are_refused(key, value, secret):
    section, _, leaf = key.partition(".")
    d = {"name": "creds", "base": {"train": {"max_steps": 2}}}
    d[section] = {leaf: value} if leaf else value
    for attempt in (lambda: load_spec(d), lambda: load_spec({**d, section: None}, [f"{key}={value}"])):
        with pytest.raises(SpecError) as info:
            attempt()
        err = str(info.value)
        assert info.value.key == key, err
        assert secret not in err, err
        assert "environment" in err and "credentials" in err
        if key == "tracking.uri":
            assert "MLFLOW_TRACKING_USERNAME" in err
        else:
            assert "AWS_" in err and "instance role" in err


def test_uris_without_credentials_are_fine(tmp_path):
    from tokentune.redact import secret_in_uri

    for uri in ("postgresql://mlflow@db:5432/mlflow", "https://mlflow.example.com", "databricks"):
        assert secret_in_uri(uri) is None
        assert load_spec({"name": "ok", "tracking": {"uri": uri}}).tracking.uri == uri
    for storage in ("s3://bucket/sweeps", "gs://bucket/sweeps?versioned=1", str(tmp_path)):
        assert load_spec({"name": "ok", "storage": storage}).storage == storage


@pytest.mark.parametrize(
    "uri, secret",
    [
        ("https://admin:" + "s3cretpassw0rd@mlflow.example.com", "s3cretpassw0rd"),
        ("https://mlflow.example.com/?token=" + "abcdef123456", "abcdef123456"),
    ],
)
def test_credentials_in_mlflow_tracking_uri_are_refused(monkeypatch, uri, secret):
    """The sweep takes its tracking URI from MLFLOW_TRACKING_URI when tracking.uri is unset: the same
    refusal as for tracking.uri, naming the variable and never echoing the secret."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(SpecError) as info:
        load_spec({"name": "creds"})
    err = str(info.value)
    assert info.value.key == "MLFLOW_TRACKING_URI" and err.startswith("MLFLOW_TRACKING_URI: ")
    assert secret not in err and "MLFLOW_TRACKING_USERNAME" in err
    # an explicit tracking.uri wins over the variable: it is not used, so not refused
    assert (
        load_spec({"name": "ok", "tracking": {"uri": "http://head:5000"}}).tracking.uri == "http://head:5000"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert load_spec({"name": "ok"}).tracking.uri is None


def test_console_errors_of_the_cli_are_redacted(tmp_path, capsys):
    """`tokentune train` prints a ConfigError as `error: ...`: through redact_text (tokentune.redact,
    the one redaction pass the orchestrator uses too)."""
    from tokentune.cli import main

    password = "s3cret" + "passw0rd"
    argv = ["train", "--output-dir", str(tmp_path / "run"), "--set", f"train.lr=https://u:{password}@host/x"]
    assert main(argv) == 2  # refused when the config is built: nothing is loaded or written
    err = capsys.readouterr().err
    assert err.startswith("error: train.lr=") and password not in err and f"u:{REDACTED}@host" in err
    assert not (tmp_path / "run").exists()


def test_trial_errors_printed_by_the_orchestrator_cli_are_redacted(monkeypatch, capsys):
    import orchestrator.run.ray_cluster
    import orchestrator.run.train_driver
    from orchestrator.cli import train_job

    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
    monkeypatch.setattr(orchestrator.run.ray_cluster, "init_ray", lambda address=None, **kw: {})
    failed = SimpleNamespace(error=f"OSError: 401 for url https://huggingface.co (token {token})")
    monkeypatch.setattr(orchestrator.run.train_driver, "run_train_job", lambda cfg, **kw: failed)
    cfg = SimpleNamespace(train=SimpleNamespace(output_dir="/tmp/x/run"))
    assert train_job(cfg, SimpleNamespace(address=None)) == 1
    err = capsys.readouterr().err
    assert "training failed" in err and token not in err and REDACTED in err
