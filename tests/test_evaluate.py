"""tokentune.evaluate: shipped lm-eval tasks on the shipped base model, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from tokentune.assets import (
    CHAT_TASKS,
    MULTI_TASK_FAMILIES,
    MULTI_TASKS,
    SHIPPED_TASK_FAMILIES,
    default_model_path,
)
from tokentune.evaluate import evaluate, parse_task_spec, shipped_tasks

CHANCE = 0.25


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    return model, AutoTokenizer.from_pretrained(default_model_path())


def test_shipped_task_names():
    assert set(shipped_tasks()) == {
        "tokentune_mini",
        *SHIPPED_TASK_FAMILIES,
        *MULTI_TASKS,
        *MULTI_TASK_FAMILIES,
        *CHAT_TASKS,
        *(f"{name}_chat" for name in SHIPPED_TASK_FAMILIES),  # the one-token families asked as a chat turn
    }


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


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_lora.yaml"


@pytest.fixture(scope="module")
def lora_200(tmp_path_factory):
    """The shipped recipe (examples/tiny_lora.yaml: 200 LoRA steps), trained once for this module."""
    from tokentune.config import load_config
    from tokentune.train import train

    out = tmp_path_factory.mktemp("lora_200") / "run"
    cfg = load_config(EXAMPLE, [f"train.output_dir={out}", "train.eval_every=100"])
    return cfg, train(cfg)


@pytest.mark.slow  # 200 training steps (29 s on 2 cores, README) and two evaluations
def test_lora_fine_tune_raises_shipped_task_accuracy_clearly_above_base(base, lora_200):
    """Issue 2's learnability check: the shipped recipe (examples/tiny_lora.yaml, 200 LoRA steps on
    CPU) lowers validation loss and lifts the shipped tasks' accuracy; the mean clearly beats base."""
    _, result = lora_200
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


def _answer_selection_probability(cfg, ratio: float) -> float:
    """Mean chance, over the shipped training rows, that TokenTune at ``ratio`` selects the position
    that predicts the (one-token) answer: k - 2 of the n - 2 positions other than the first and last
    real token are drawn uniformly (``TokenTuneSettings``), and that position is neither first nor last."""
    import torch

    from tokentune.data import load_splits
    from tokentune.methods.tokentune.method import num_selected
    from tokentune.models import load_tokenizer

    train_set, _ = load_splits(cfg.data, load_tokenizer(cfg.model))
    n = torch.tensor([len(ids) for ids in train_set.input_ids])
    k = num_selected(n, ratio=ratio)
    return float(((k - 2) / (n - 2)).mean())


@pytest.mark.slow  # ~900 training steps and three evaluations (600 documents each)
def test_lora_tokentune_learns_like_lora_per_supervised_answer_token(base, lora_200, tmp_path):
    """Issue 3's quality check on the tiny default. The shipped answers are one token in a sequence
    of about 20, so at r=0.3 a step trains on the answer of only ~1/4 of its examples (computed
    here from the shipped data, not assumed). Given the same number of answer-token gradients as
    200 LoRA steps (200 / p steps), [lora, tokentune] must lower validation loss, beat base clearly
    and score like LoRA. bench/quality.py measured 0.730 ± 0.012 against 0.712 ± 0.018 over 3 seeds
    at 800 vs 200 steps, and 0.57 against 0.71 at equal steps (the expected shortfall)."""
    from tokentune.config import load_config
    from tokentune.train import train

    lora_cfg, lora_run = lora_200
    p = _answer_selection_probability(lora_cfg, 0.3)
    assert 0.15 < p < 0.35, p  # shipped rows are 17-24 tokens long
    steps = round(lora_cfg.train.max_steps / p)
    tt_cfg = load_config(
        EXAMPLE,
        [
            f"train.output_dir={tmp_path / 'tokentune'}",
            "methods=[lora,tokentune]",
            "tokentune.ratio=0.3",
            f"train.max_steps={steps}",
            f"train.eval_every={steps // 2}",
        ],
    )
    tt_run = train(tt_cfg)
    val = [h["val_loss"] for h in tt_run.history if "val_loss" in h]
    assert len(val) >= 2 and val[-1] < val[0], val
    fracs = [h["tokentune/selected_frac"] for h in tt_run.history if "tokentune/selected_frac" in h]
    assert fracs and all(0.25 < f < 0.45 for f in fracs), fracs  # ceil(0.3 n) of n real tokens

    model, tok = base
    base_acc = evaluate(model, tok, limit=60, batch_size=32)["metrics"]["eval/tokentune_mini/acc"]
    # every shipped document (600): a binomial standard error of ~0.018 per score
    lora_acc = evaluate(lora_run.final_dir, batch_size=32)["metrics"]["eval/tokentune_mini/acc"]
    tt_acc = evaluate(tt_run.final_dir, batch_size=32)["metrics"]["eval/tokentune_mini/acc"]
    print(f"p={p:.3f} steps={steps}: base {base_acc:.3f}, lora {lora_acc:.3f}, lora+tokentune {tt_acc:.3f}")
    assert tt_acc >= base_acc + 0.25, (base_acc, tt_acc)
    # One run's score moves by up to ~0.04 with small changes to the run (bench/quality.py: sd 0.012
    # to 0.018 over 3 seeds; seed 0 at 800 steps with eval_every=100 gave 0.727, this run 0.768), so
    # "like LoRA" is within 0.08, well inside the 0.14 gap that equal steps show.
    assert abs(tt_acc - lora_acc) <= 0.08, (lora_acc, tt_acc)
