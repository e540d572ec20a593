"""The ``tokentune`` command: help that explains, single runs, clear errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from orchestrator.cli import build_parser, main
from tests.conftest import tiny_run_dict


@pytest.mark.parametrize("sub", ["train", "merge", "sweep", "eval", "methods"])
def test_every_subcommand_explains_its_options(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    parser = build_parser()
    action = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    for opt in action.choices[sub]._actions:
        if opt.option_strings and opt.dest != "help":
            assert opt.help, f"tokentune {sub} {opt.option_strings} has no help text"
            assert opt.option_strings[0] in out


def test_help_is_fast_and_imports_no_ray():
    code = "import sys; from orchestrator.cli import main; main(['--help'])"
    r = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert "tokentune sweep" in r.stdout
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import orchestrator.cli, sys; print('ray' in sys.modules, 'mlflow' in sys.modules)",
        ],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "False False", r.stderr[-2000:]


def test_train_then_merge(tiny_workspace, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_dict(tiny_workspace, ["lora"], tmp_path / "out")))
    assert main(["train", str(cfg), "--set", "lora.rank=4", "--set", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "step 3/3" in out and "done: 3 steps" in out
    assert (tmp_path / "out" / "final" / "adapter_config.json").exists()
    assert main(["merge", str(tmp_path / "out" / "final"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").exists()


def test_bad_input_exits_2_naming_the_key(tiny_workspace, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_dict(tiny_workspace, ["lora"], tmp_path / "out")))
    assert main(["train", str(cfg), "--set", "lora.rank=0"]) == 2
    assert "lora.rank=0" in capsys.readouterr().err
    assert main(["train", str(cfg), "--set", "methods=[lora,nope]"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["train", str(cfg), "--set", "data.train=/no/such/file.jsonl"]) == 2
    assert "/no/such/file.jsonl" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert not (tmp_path / "out" / "final").exists()


def test_methods_lists_every_registered_method(capsys):
    from tokentune.config import SECTIONS
    from tokentune.methods import REGISTRY
    from tokentune.settings import describe

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert name in out
        for doc in describe(REGISTRY[name].config_cls, name):
            assert f"{doc.key} = " in out and doc.help in out  # every setting, its default and help
    assert "lora.rank = 8" in out and "train.lr = " not in out
    assert main(["methods", "--all"]) == 0
    out = capsys.readouterr().out
    assert "lora.rank = 8" in out and "methods = [lora]" in out and "model.name_or_path = null" in out
    for name, section in SECTIONS.items():
        for doc in describe(section, name):
            assert f"{doc.key} = " in out and doc.help in out


def test_tokentune_cli_runs_without_the_orchestrator(tiny_workspace, tmp_path, capsys):
    """``tokentune.cli`` (Ray-free) has train/merge/eval/methods; a distributed config is a clear error."""
    from tokentune import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "methods" in out and "sweep" not in out
    assert cli.main([]) == 2
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_dict(tiny_workspace, ["lora"], tmp_path / "out")))
    assert cli.main(["train", str(cfg), "--workers", "2"]) == 2
    assert "compute.workers=2" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), "--print-config", "--set", "lora.rank=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lora"]["rank"] == 4
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tokentune.cli; print('ray' in sys.modules, 'mlflow' in sys.modules)",
        ],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "False False", r.stderr[-2000:]


def test_sweep_summary_counts_stopped_trials_apart_from_failed(monkeypatch, capsys):
    """Trials an ASHA scheduler stopped early are reported as stopped, not failed; the last lines say
    where the results and the MLflow compare view are."""
    import orchestrator.api as api
    from orchestrator.results.types import SweepResult, TrialResult

    trials = [TrialResult(f"t{i}", {}, {}, s) for i, s in enumerate(["finished"] * 6 + ["stopped"] * 2)]
    result = SweepResult(
        name="joint", sweep_dir="/s/joint", trials=trials, results_csv="/s/joint/results.csv",
        tracking_uri="sqlite:////s/joint/mlflow.db", mlflow_compare_url="http://127.0.0.1:5000/#/compare-runs?x",
    )  # fmt: skip
    monkeypatch.setattr(api, "run_sweep", lambda *a, **k: result)
    assert main(["sweep", "search_spaces/joint_search.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == "sweep joint: 6 finished, 2 stopped early (scheduler or time limit), 0 failed -> /s/joint"
    )
    assert out[1] == "results: /s/joint/results.csv and pareto.png beside it"
    assert "mlflow ui --backend-store-uri sqlite:////s/joint/mlflow.db --host 127.0.0.1" in out[2]
    assert out[3].strip() == "http://127.0.0.1:5000/#/compare-runs?x"


def test_help_spec_lists_every_spec_setting(capsys):
    """``tokentune sweep --help-spec`` (no spec file needed) prints each spec section's settings with their
    defaults and help, from the sections' own ``describe()``."""
    from orchestrator.spec.sections import SECTIONS, section_docs
    from tokentune.reference import format_value

    with pytest.raises(SystemExit) as e:
        main(["sweep", "--help-spec"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SECTIONS:
        for doc in section_docs(name):
            assert f"{doc.key} = {format_value(doc.default)}" in out and doc.help in out
    assert "after_trial.action = merge+eval" in out and "tune.max_memory_gb = null" in out


def test_sweep_dry_run_of_a_spec_for_another_machine(capsys):
    """Offline, a paper spec's hub model is not here: its dry run is refused, naming --no-input-checks,
    and runs with it, saying what was not checked and estimating memory from the model's known shape."""
    spec = "search_spaces/tokentune_paper.yaml"
    assert main(["sweep", spec, "--dry-run"]) == 2
    assert "--no-input-checks" in capsys.readouterr().err
    assert main(["sweep", spec, "--dry-run", "--no-input-checks"]) == 0
    out = capsys.readouterr().out
    assert "note: inputs not checked" in out and "meta-llama/Llama-2-7b-hf" in out
    assert " GB (weights " in out and "memory: unknown" not in out
