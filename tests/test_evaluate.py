"""tokentune.evaluate: shipped lm-eval tasks on the shipped base model, offline."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from tokentune.assets import SHIPPED_TASK_FAMILIES, default_model_path
from tokentune.evaluate import evaluate, parse_task_spec, shipped_tasks

CHANCE = 0.25


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    return model, AutoTokenizer.from_pretrained(default_model_path())


def test_shipped_task_names():
    assert set(shipped_tasks()) == {"tokentune_mini", *SHIPPED_TASK_FAMILIES}


def test_parse_task_spec():
    assert parse_task_spec("arc_challenge:25") == ("arc_challenge", 25)
    assert parse_task_spec(" tt_next ") == ("tt_next", None)


def test_base_model_scores_near_chance(base):
    model, tok = base
    out = evaluate(model, tok, limit=40, batch_size=32)
    accs = [out["results"][name]["acc"] for name in SHIPPED_TASK_FAMILIES]
    assert sum(accs) / len(accs) < CHANCE + 0.15  # a fine-tuned model reaches well above this
    assert all(acc < 0.55 for acc in accs), accs
    assert out["metrics"]["eval/tokentune_mini/acc"] == pytest.approx(sum(accs) / len(accs))
    assert {f"eval/{name}/acc" for name in SHIPPED_TASK_FAMILIES} <= set(out["metrics"])
    json.dumps(out["raw"])  # serialisable
    assert model.training is False


def test_evaluate_from_path_single_task_is_deterministic():
    a = evaluate(str(default_model_path()), tasks="tt_category", limit=20)
    b = evaluate(default_model_path(), tasks=["tt_category:0"], limit=20)
    assert set(a["results"]) == {"tt_category"}
    assert a["metrics"] == b["metrics"]


def test_unknown_task_is_a_value_error(base):
    model, tok = base
    with pytest.raises(ValueError, match="no_such_task_xyz") as err:
        evaluate(model, tok, tasks=["tt_category", "no_such_task_xyz"])
    assert "tokentune_mini" in str(err.value)


def test_empty_task_list_is_a_value_error(base):
    model, tok = base
    with pytest.raises(ValueError, match="no evaluation tasks"):
        evaluate(model, tok, tasks=" , ")


@pytest.mark.slow
def test_builtin_task_without_offline_dataset_is_a_clear_error(base):
    """Indexes lm-eval's built-in tasks (~15 s); offline, an uncached dataset must fail fast."""
    model, tok = base
    with pytest.raises(RuntimeError, match="arc_easy"):
        evaluate(model, tok, tasks=["arc_easy:5"], limit=2)


def test_lora_fine_tune_raises_shipped_task_accuracy_clearly_above_base(base, tmp_path):
    """Issue 2's learnability check: the shipped recipe (examples/tiny_lora.yaml, 200 LoRA steps on
    CPU) lowers validation loss and lifts the shipped tasks' accuracy; the mean clearly beats base."""
    from pathlib import Path

    from tokentune.config import load_config
    from tokentune.train import train

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_lora.yaml"
    cfg = load_config(example, [f"train.output_dir={tmp_path / 'run'}", "train.eval_every=100"])
    result = train(cfg)
    val = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert len(val) >= 2 and val[-1] < val[0], val

    model, tok = base
    before = evaluate(model, tok, limit=60, batch_size=32)["metrics"]
    after = evaluate(result.final_dir, limit=60, batch_size=32)["metrics"]
    gain = {n: after[f"eval/{n}/acc"] - before[f"eval/{n}/acc"] for n in SHIPPED_TASK_FAMILIES}
    base_mean, tuned_mean = before["eval/tokentune_mini/acc"], after["eval/tokentune_mini/acc"]
    print(f"base {base_mean:.3f} -> fine-tuned {tuned_mean:.3f}; per-task gain {gain}")
    assert tuned_mean >= base_mean + 0.25, (base_mean, tuned_mean)
    assert sum(g > 0.1 for g in gain.values()) >= 3, gain
