"""No secret leaves a sweep: one table of secret shapes (Hugging Face, AWS, GCP, Azure, Databricks, URL
userinfo, query tokens) goes through every output path (``status.json`` and ``events.jsonl``,
``eval.json``, the results' ``error`` column, the dry-run plan, MLflow tags, ``error.txt`` and text
artifacts), and nowhere does the secret come out. Credentials inside ``tracking.uri``, ``storage`` or the
``MLFLOW_TRACKING_URI`` a sweep would use are refused, naming the key and never echoing the secret; the
console errors of both CLIs are redacted."""

from __future__ import annotations

import json
import os
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


# ---- secret-shaped config values and descriptions: one redaction pass for every output -----------------
TOKEN_PATH = f"/data/{SECRETS['huggingface'][0]}/train.jsonl"  # a path whose folder looks like a token


def _searched_trials() -> list[dict]:
    searched = {"lora.rank": 4, "data.train": TOKEN_PATH, "hub.auth_token": "plain-but-named-secret"}
    metrics = {"eval/score": 0.5, "memory/train_gb": 0.1}
    return [
        {"trial_id": "t1", "status": "finished", "searched": searched, "metrics": metrics},
        {"trial_id": "t2", "status": "failed", "searched": searched, "error": TEXTS["aws_secret"]},
    ]


def _assert_masked(produced: str, where: str) -> None:
    assert SECRETS["huggingface"][0] not in produced, f"the hf_ folder leaks through {where}"
    assert "plain-but-named-secret" not in produced, f"hub.auth_token leaks through {where}"
    assert_no_secret(produced, where)


def test_results_files_and_console_table_mask_secret_shaped_values(tmp_path):
    from orchestrator.results import report
    from orchestrator.results.console import searched_text

    keys = ["lora.rank", "data.train", "hub.auth_token"]
    rows = report.results_table(_searched_trials(), search_keys=keys)
    assert rows[0]["data.train"] == f"/data/{REDACTED}/train.jsonl" and rows[0]["hub.auth_token"] == REDACTED
    raw = [{"trial_id": "t1", "data.train": TOKEN_PATH, "hub.auth_token": "plain-but-named-secret"}]
    for table in (rows, raw):  # the writers mask a table that did not come from results_table, too
        _assert_masked(report.write_csv(table, tmp_path / "results.csv").read_text(), "results.csv")
        _assert_masked(report.write_json(table, tmp_path / "results.json").read_text(), "results.json")
        _assert_masked(report.format_table(table, max_cell=200), "the console table")
        _assert_masked(json.dumps(report.column_table(table)), "MLflow's results table")
    _assert_masked(searched_text(_searched_trials()[0]["searched"], limit=500), "the progress lines")


def test_the_summary_upload_goes_through_the_redacting_path(tracker, tmp_path):
    """``log_summary`` with a raw table: the files it writes, the artifacts, the table, the description."""
    tr, _ = tracker
    tr.start_parent()
    raw = [{"trial_id": "t1", "status": "finished", "data.train": TOKEN_PATH, "eval/score": 0.5}]
    paths = tr.log_summary(raw, tmp_path / "out", description=f"| t1 | {TOKEN_PATH} |")
    for path in paths.values():
        if path.suffix != ".png":
            _assert_masked(path.read_text(), path.name)
    out = tmp_path / "downloaded"
    for name in ("results.csv", "results.json", "results_table.json"):
        local = Path(tr.client.download_artifacts(tr.parent_run_id, name, str(out)))
        _assert_masked(local.read_text(), f"the artifact {name}")
    for key, value in tr.client.get_run(tr.parent_run_id).data.tags.items():
        _assert_masked(value, f"the tag {key}")


def test_sweep_yaml_is_redacted_and_a_resume_takes_the_masked_values_from_the_given_spec(tmp_path):
    import yaml

    from orchestrator.api import SPEC_FILE, _stored_spec, _write_spec

    d = {
        "name": "s",
        "description": f"owner token {SECRETS['huggingface'][0]}",
        "base": {"train": {"max_steps": 2}, "data": {"train": TOKEN_PATH}},
        "search": {"data.val": {"grid": [TOKEN_PATH, "/data/val.jsonl"]}},
        "storage": str(tmp_path),
    }
    spec = load_spec(d, check_inputs=False)
    _write_spec(spec, tmp_path / "s", None, resume=False)
    stored = (tmp_path / "s" / SPEC_FILE).read_text()
    _assert_masked(stored, SPEC_FILE)
    assert yaml.safe_load(stored)["description"] == f"owner token {REDACTED}"
    resumed = _stored_spec(spec, tmp_path / "s", str(tmp_path / "s"), check_inputs=False)
    assert resumed.to_dict() == spec.to_dict()  # what was masked comes back from the spec given again


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


# ---- one real sweep: credentials in the environment, a secret-shaped config value and description -------
CANARY = "ttcanary" + "Q7zR2kX9mL4pW8vN"  # unique, not secret-shaped: only a copy of the variable has it
#: the credential variables the README tells users to set (storage, MLflow login)
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
)


def _files_holding(needle: str, *roots: Path) -> list[str]:
    """Every regular file under ``roots`` whose bytes contain ``needle`` (links and sockets skipped)."""
    hits = []
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file() and not p.is_symlink() and needle.encode() in p.read_bytes():
                hits.append(str(p))
    return hits


#: the child process: the sweep as ``tokentune sweep`` runs it (Ray started by us, console on), then what a
#: Ray worker sees of the credential variables
CANARY_SWEEP = """
import json, os, sys
import ray
from orchestrator.api import run_sweep
res = run_sweep(sys.argv[1], sys.argv[3:], name="canary")
worker_env = ray.remote(num_cpus=0)(lambda names: {n: os.environ.get(n) for n in names})
seen = ray.get(worker_env.remote(sys.argv[2].split(",")))
ray.shutdown()
print("RESULT " + json.dumps({"sweep_dir": res.sweep_dir, "status": [t.status for t in res.trials], "env": seen}))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_canary_sweep_leaves_no_secret_in_sweep_folder_mlflow_or_ray_logs(tmp_path):
    """One tiny quickstart sweep (one LoRA trial, 6 steps) with a canary in each credential variable the
    README names, a Hugging Face token-shaped folder in a searched data path and a token in the spec's
    description. The credentials reach the workers (inherited from the Ray the sweep starts, not via a
    runtime_env) and are in no file under the sweep folder (the MLflow store included) or Ray's session
    folder; the token-shaped values are masked in sweep.yaml, results.csv/.json, MLflow and the console."""
    import shutil
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    token_dir = "hf_" + "CfgCanaryAbCdEfGhIjKlMnOp"  # secret-shaped, a folder name in data.train
    described = "hf_" + "DescCanaryQrStUvWxYz0123"  # secret-shaped, in the description
    data = tmp_path / token_dir / "train.jsonl"
    data.parent.mkdir()
    shutil.copyfile(root / "tokentune" / "assets" / "data" / "instruct_train.jsonl", data)
    ray_tmp = Path(tempfile.mkdtemp(prefix="tt-canary-"))  # short: Ray's socket paths stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update({var: f"{CANARY}-{var}" for var in CREDENTIAL_VARS})
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(root))
    overrides = [
        f"storage={tmp_path / 'sweeps'}",
        "methods=[lora]",
        "search.lora.rank={grid: [4]}",
        f"search.data.train={data}",
        f"description=owner token {described}",
        "train.max_steps=6",
        "train.batch_size=8",
        "train.log_every=3",
        "train.warmup_steps=1",
        "eval.limit=8",
    ]
    try:
        quickstart = str(root / "search_spaces" / "quickstart.yaml")
        cmd = [sys.executable, "-c", CANARY_SWEEP, quickstart, ",".join(CREDENTIAL_VARS), *overrides]
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-3000:]
        res = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        assert res["status"] == ["finished"]
        assert res["env"] == {v: f"{CANARY}-{v}" for v in CREDENTIAL_VARS}, "workers lack the credentials"
        sweep_dir = Path(res["sweep_dir"])
        mlflow_store = sweep_dir / "mlflow.db", sweep_dir / "mlartifacts"
        assert all(p.exists() for p in mlflow_store) and list((ray_tmp / "ray").glob("session_*/logs/*"))
        assert _files_holding(CANARY, sweep_dir, ray_tmp) == []
        assert _files_holding(described, sweep_dir, ray_tmp) == []
        outputs = [sweep_dir / "sweep.yaml", sweep_dir / "results.csv", sweep_dir / "results.json"]
        assert _files_holding(token_dir, *outputs, *mlflow_store) == []
        assert "data.train" in (sweep_dir / "results.csv").read_text()  # the column is there, masked
        console = out.split("RESULT ", 1)[0]  # what the sweep printed (the RESULT line is the check's)
        assert "best trial:" in console, console[-3000:]
        for needle in (token_dir, described, CANARY):
            assert needle not in console, [line for line in console.splitlines() if needle in line]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
