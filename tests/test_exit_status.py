"""What a command says when something goes wrong (issue 27, item 7): a sweep's exit status and last line
say whether trials failed; the printed ``mlflow ui`` command is shell-quoted; ``tokentune merge`` never
writes into a folder that holds something unless ``--overwrite``; a refused pickle and a NaN loss in
``tokentune train`` are one line each, not a traceback."""

from __future__ import annotations

import pickle
import shlex

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.results.mlflow_ui import serve_hint
from orchestrator.results.summary import sweep_summary
from orchestrator.results.types import SweepResult, TrialResult
from tests.conftest import tiny_run_dict


def result_of(*statuses: str) -> SweepResult:
    trials = [
        TrialResult(f"t{i}", {}, {}, s, error="boom" if s == "failed" else None)
        for i, s in enumerate(statuses)
    ]
    return SweepResult(
        "s", "/s/s", trials, results_csv="/s/s/results.csv", tracking_uri="sqlite:////s/s/mlflow.db",
        mlflow_compare_url="http://127.0.0.1:5000/#/compare-runs?x",
    )  # fmt: skip


def test_exit_status_and_last_line_from_the_trials_outcomes():
    lines, code = sweep_summary(result_of("finished", "stopped", "finished"))
    assert (
        code == 0
        and lines[0] == "sweep s: 2 finished, 1 stopped early (scheduler or time limit), 0 failed -> /s/s"
    )
    assert "fail" not in lines[-1]
    lines, code = sweep_summary(result_of("finished", "failed", "finished", "failed"))
    assert code == 3
    assert lines[-1] == (
        "sweep s: 2 of 4 trials failed or did not run: t1, t3; their errors are in /s/s/results.csv (exit status 3)"
    )
    lines, code = sweep_summary(result_of("failed", "failed"))
    assert (
        code == 1 and lines[-1].startswith("sweep s: all 2 trials failed") and "(exit status 1)" in lines[-1]
    )
    lines, code = sweep_summary(result_of("finished", "pending"))  # a trial that never ran is no success
    assert code == 3 and "1 of 2 trials" in lines[-1] and "t1" in lines[-1]
    assert sweep_summary(result_of()) == (sweep_summary(result_of())[0], 1)
    assert sweep_summary(result_of(*["failed"] * 8))[0][-1].count(", ") == 4  # five named, the rest counted
    quiet, code = sweep_summary(result_of("finished", "failed"), quiet=True)  # only the line that matters
    assert code == 3 and len(quiet) == 1 and "1 of 2 trials failed" in quiet[0]


def test_tokentune_sweep_exits_with_the_summarys_status(monkeypatch, capsys):
    import orchestrator.api as api

    monkeypatch.setattr(api, "run_sweep", lambda *a, **k: result_of("finished", "failed"))
    assert main(["sweep", "search_spaces/quickstart.yaml"]) == 3
    assert capsys.readouterr().out.splitlines()[-1].endswith("(exit status 3)")
    monkeypatch.setattr(api, "run_sweep", lambda *a, **k: result_of("failed", "failed"))
    assert main(["sweep", "search_spaces/quickstart.yaml", "--quiet"]) == 1
    assert "all 2 trials failed" in capsys.readouterr().out.splitlines()[-1]


def test_sweep_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 every trial finished" in out and "3 some trials failed" in out


def test_the_mlflow_ui_command_is_shell_quoted():
    uri = "sqlite:////home/me/my sweeps/$HOME;rm -rf x/mlflow.db"
    hint = serve_hint(uri)
    assert shlex.split(hint) == ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    assert (
        serve_hint("sqlite:////s/mlflow.db")
        == "mlflow ui --backend-store-uri sqlite:////s/mlflow.db --host 127.0.0.1"
    )


def test_merge_overwrite_a_refused_pickle_and_a_nan_loss(tiny_workspace, tmp_path, capsys):
    """``tokentune merge`` into a non-empty folder: refused (exit 2, naming it) unless ``--overwrite``, which
    replaces the folder once the merge succeeded; a resumed run whose checkpoint holds a pickle with code
    is refused in one line; a NaN loss stops training in one line."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(tiny_run_dict(tiny_workspace, ["lora"], tmp_path / "out", train={"save_every": 2}))
    )
    assert main(["train", str(cfg), "--set", "train.max_steps=3"]) == 0  # checkpoint-000002, then final/
    final, merged = tmp_path / "out" / "final", tmp_path / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["merge", str(final), str(merged)]) == 2
    err = capsys.readouterr().err
    assert str(merged) in err and "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert (merged / "notes.txt").read_text() == "mine" and not (merged / "config.json").exists()
    assert main(["merge", str(final), str(final)]) == 2 and "adapter" in capsys.readouterr().err
    assert main(["merge", str(final), str(merged), "--overwrite"]) == 0
    assert (merged / "config.json").is_file() and not (merged / "notes.txt").exists()

    # a checkpoint file that holds code: torch.load(weights_only=True) refuses it, in one line
    class Planted:
        def __reduce__(self):
            return (print, ("planted code ran",))

    ckpt = tmp_path / "out" / "checkpoint-000002"
    (ckpt / "trainable.pt").write_bytes(pickle.dumps(Planted(), protocol=2))
    capsys.readouterr()
    assert main(["train", str(cfg), "--set", "train.max_steps=4", "--resume"]) == 1
    out, err = capsys.readouterr()
    assert "planted code ran" not in out + err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(ckpt) in lines[0] and "refused to load checkpoint" in lines[0], err

    # a NaN loss (a model whose final norm is NaN): one line, exit 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_workspace["model"])
    model.model.norm.weight.data.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_model")
    run = tiny_run_dict(tiny_workspace, ["lora"], tmp_path / "nan")
    run["model"] = {"name_or_path": str(tmp_path / "nan_model"), "tokenizer": tiny_workspace["model"]}
    nan_cfg = tmp_path / "nan.yaml"
    nan_cfg.write_text(yaml.safe_dump(run))
    assert main(["train", str(nan_cfg)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "loss became nan" in lines[0] and "Traceback" not in err, err
