"""Shared fixtures: tiny random models built from configs (no downloads), offline hub, seeds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_tiny_causal_lm(
    family: str = "llama",
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn: str = "sdpa",
):
    """A random decoder of the given family (llama, mistral, qwen2, qwen3), built from its config."""
    import transformers

    cfg_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[family]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    return model.to(dtype)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (Ray, MLflow and torch.distributed rendezvous in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine they lose 10-30x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama():
    return make_tiny_causal_lm()


@pytest.fixture
def tiny_llama_factory():
    return make_tiny_causal_lm


def build_tiny_workspace(root, num_layers: int = 3, hidden: int = 64, n_train: int = 240, n_val: int = 40):
    """A tiny Llama checkpoint + BPE tokenizer + Alpaca JSONL data in ``root`` (seconds, offline)."""
    import json
    import random
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tokentune.data import ALPACA_TEMPLATE

    root = Path(root)
    rng = random.Random(0)
    rows = []
    for _ in range(n_train + n_val):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append(
            {"instruction": "Which number is larger?", "input": f"{a} or {b}", "output": str(max(a, b))}
        )
    for name, part in (("train.jsonl", rows[:n_train]), ("val.jsonl", rows[n_train:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    texts = [ALPACA_TEMPLATE["prompt_input"].format(**r) + r["output"] for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=700,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    return {
        "root": root,
        "model": str(model_dir),
        "train": str(root / "train.jsonl"),
        "val": str(root / "val.jsonl"),
    }


def tiny_run_dict(ws, methods, out_dir, **sections):
    """A run-config dict on the tiny workspace; ``sections`` deep-update it (e.g. train={...})."""
    d = {
        "model": {"name_or_path": ws["model"]},
        "data": {"train": ws["train"], "val": ws["val"], "max_length": 96},
        "methods": list(methods),
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 0,
            "log_every": 1,
            "eval_batches": 1,
            "output_dir": str(out_dir),
        },
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return d


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    return build_tiny_workspace(tmp_path_factory.mktemp("tiny_ws"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where CUDA is visible and are skipped (with the reason) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
