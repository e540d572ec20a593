"""Merged checkpoints reproduce the adapter model (LoRA, DoRA); the QLoRA merge error is measured."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_run_dict
from tokentune.config import ConfigError, RunConfig
from tokentune.merge import merge_adapter
from tokentune.train import train

MERGE_TOL = 1e-4  # float32 merge: W + B A * s computed once vs on the fly


def _trained_adapter(ws, tmp_path, methods):
    d = tiny_run_dict(ws, methods, tmp_path / "run", train={"max_steps": 3, "lr": 1e-2})
    d[methods[-1]] = {"rank": 4}
    return train(RunConfig.from_dict(d))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_logits_equal_adapter_logits(method, tiny_workspace, tmp_path):
    from peft import PeftModel

    res = _trained_adapter(tiny_workspace, tmp_path, [method])
    assert res.is_adapter
    merged_dir = merge_adapter(res.final_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_workspace["model"])
    adapted = PeftModel.from_pretrained(base, res.final_dir).eval()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    a, m = _logits(adapted, ids), _logits(merged, ids)
    assert (a - m).abs().max().item() < MERGE_TOL
    # the adapter really changed the model, so the comparison means something
    plain = AutoModelForCausalLM.from_pretrained(tiny_workspace["model"]).eval()
    assert (_logits(plain, ids) - m).abs().max().item() > 10 * MERGE_TOL


def test_qlora_merge_goes_into_full_precision_base(tiny_workspace, tmp_path, capsys):
    """A QLoRA adapter merges into the fp32 base. Its logits differ from the 4-bit training model only by
    the base's NF4 quantisation error, which we measure and print (documented in README)."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    res = _trained_adapter(tiny_workspace, tmp_path, ["qlora", "lora"])
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(res.final_dir, tmp_path / "merged")).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base4 = AutoModelForCausalLM.from_pretrained(tiny_workspace["model"], quantization_config=q)
    adapted4 = PeftModel.from_pretrained(base4, res.final_dir).eval()
    fp_base = AutoModelForCausalLM.from_pretrained(tiny_workspace["model"])
    adapted_fp = PeftModel.from_pretrained(fp_base, res.final_dir).eval()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    m = _logits(merged, ids)
    exact = (_logits(adapted_fp, ids) - m).abs().max().item()
    quant = (_logits(adapted4, ids) - m).abs().max().item()
    with capsys.disabled():
        print(
            f"\nQLoRA merge: max|logit diff| vs fp32 adapter model {exact:.2e}, vs 4-bit training model {quant:.3f}"
        )
    assert exact < MERGE_TOL  # the merge itself is exact
    assert quant < 1.0  # what remains is the NF4 rounding of the base


def test_merge_rejects_a_non_adapter_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a peft adapter directory"):
        merge_adapter(tmp_path, tmp_path / "out")
