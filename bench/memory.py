"""Training memory per method: the estimate, the measured breakdown and (CUDA) the allocator's peak,
each as a share of full fine-tuning; and what measuring costs.

    python bench/memory.py                                   # CPU: Llama 4 x 512, vocab 32000, seq 512
    python bench/memory.py --device cuda --preset llama2-7b --seq 2048 --batch 1   # the TokenTune paper's setting
    python bench/memory.py --overhead                        # the meter's cost on step time only
    python bench/memory.py --combinations --dtype bfloat16   # every method combination, two bf16 settings

Rows (``ROWS``): full fine-tuning, LoRA, QLoRA, LoRA + TokenTune and QLoRA + TokenTune at
``--ratio`` (0.3), LoRA + IST / RST at ``--budget`` (25% of the layers), and LoRA and LoRA + TokenTune
with every layer checkpointed (``checkpointing``). Each row runs
``tokentune.train`` itself, in a fresh process, on a Llama with random weights (saved once, so QLoRA
quantizes it on load as training would) and rows long enough to fill ``--seq`` (every token
supervised): ``--steps`` steps (IST/RST: ``--sparse-steps``, so that every layer has trained and
the first layer was the lowest trained one at some step: their peak, which the estimate gives), the
breakdown measured on every step (``train.log_every`` 1).

Columns: ``estimate`` (``tokentune.estimate`` at the measured micro-batch shape), ``train`` (the
measured ``memory/train_gb``: weights + grads + optimizer + saved activations, per worker),
``est/meas``, on CUDA ``cuda_peak`` (``torch.cuda.max_memory_allocated`` since the model was
loaded, which adds the allocator's temporaries and kernels' workspaces), and the share of full
fine-tuning of each. The TokenTune paper reports (Llama-2-7B, seq 2048, batch 1, GPU peak): QLoRA
about 37% and QLoRA + TokenTune about 21% of full fine-tuning.

Each row's process builds its own model, and the random checkpoint is saved by a process of its own
first: the parent never touches the device, so a row has the whole GPU (the ``full`` row of the 7B
preset needs about 63 GiB of an 80 GB H100). IST's probe batch is the training batch
(``ist.probe_batch_size`` = ``--batch``), so IST's peak is its training step's, not a larger probe's.

``--combinations``: instead of the rows, every method combination the registry allows (the contract
test's list), on the shipped tiny model at ``--seq`` 128, batch 2 unless given, each in its own
process; the estimate against the measured ``memory/train_gb``. With ``--dtype bfloat16`` it runs two
settings side by side: bf16 weights (``model.dtype: bfloat16``) and bf16 autocast over fp32 weights
(``model.dtype: float32``), both with ``train.bf16: true`` (what ``auto`` gives on a GPU).

``--overhead``: one process, LoRA + TokenTune on the CPU shape (or the preset), ``--rounds``
rounds of ``--steps`` steps with the meter sampling every step and ``--steps`` without, the order
alternating per round; prints the median step time of each, their ratio per round (median and
spread), and the cost amortised over ``train.log_every`` = 10 (the meter samples one step in ten).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.methods import PRESETS, checkpoint_dir  # noqa: E402

GB = 1024**3
#: row name -> methods (the ratio and budget come from the flags)
ROWS: dict[str, list[str]] = {
    "full": ["full"],
    "lora": ["lora"],
    "qlora": ["qlora", "lora"],
    "lora+tokentune": ["lora", "tokentune"],
    "qlora+tokentune": ["qlora", "lora", "tokentune"],
    "lora+ist": ["lora", "ist"],
    "lora+rst": ["lora", "rst"],
    "lora+checkpointing": ["lora", "checkpointing"],
    "lora+tokentune+checkpointing": ["lora", "tokentune", "checkpointing"],
}
WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma tau omega one two three".split()
)


def data_file(args: argparse.Namespace) -> Path:
    """Instruction rows that every tokenizer here turns into more than ``--seq`` tokens."""
    path = Path(args.cache_dir) / f"long-{args.seq}.jsonl"
    if not path.exists():
        rng = random.Random(0)
        rows = [
            {
                "instruction": "Continue the list.",
                "input": "",
                "output": " ".join(rng.choices(WORDS, k=2 * args.seq)),
            }
            for _ in range(8 * max(args.batch, 1))
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(args: argparse.Namespace, methods: list[str], out_dir: str) -> dict[str, Any]:
    from tokentune import assets

    sparse = any(m in methods for m in ("ist", "rst"))
    d: dict[str, Any] = {
        "model": {
            "name_or_path": args.model or str(checkpoint_dir(args)),
            "tokenizer": str(assets.default_model_path()),  # ids < 1612: any vocab here covers them
            "dtype": args.dtype,
        },
        "data": {"train": str(data_file(args)), "val": str(data_file(args)), "max_length": args.seq,
                 "train_on_inputs": True},
        "methods": methods,
        "train": {"max_steps": args.sparse_steps if sparse else args.steps, "batch_size": args.batch, "log_every": 1, "eval_batches": 1,
                  "warmup_steps": 0, "output_dir": out_dir, "lr": 1e-4, "bf16": args.train_bf16},
        "compute": {"use_gpu": args.device == "cuda"},
        "lora": {"rank": args.lora_rank},
    }  # fmt: skip
    if "qlora" in methods:
        d["qlora"] = {"compute_dtype": "bfloat16" if args.dtype == "bfloat16" else "float32"}
    if "tokentune" in methods:
        d["tokentune"] = {"ratio": args.ratio}
    for m in ("ist", "rst"):
        if m in methods:
            d[m] = {"budget": args.budget, "seed": 0}
    if "ist" in methods:  # the probe batch is the training batch (its default, 16, would set IST's peak)
        d["ist"]["probe_batch_size"] = args.batch
    return d


def measure_row(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from tokentune.config import RunConfig
    from tokentune.estimate import estimate_measured
    from tokentune.train import train

    methods = ROWS[name] if name in ROWS else name.split("+")
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig.from_dict(run_config(args, methods, out))
        res = train(cfg)
    est = estimate_measured(cfg, res.memory)
    m = res.memory
    row = {"row": name, "methods": "+".join(cfg.methods), "estimate_gb": est.total_gb}
    row.update({k.removeprefix("memory/"): v for k, v in m.items()})
    row["seq_len"] = m.get("memory/peak_seq_len")
    return row


def run_rows(
    args: argparse.Namespace, argv: list[str], names: list[str] | None = None
) -> list[dict[str, Any]]:
    """Each row (a ``ROWS`` name or a ``+``-joined method list) in a process of its own."""
    results = []
    names = names or args.rows
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, *argv, "--row", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append({"row": name, "error": " | ".join(tail)})
            continue
        results.append(json.loads(lines[-1]))
        r = results[-1]
        print(f"    est/meas {r['estimate_gb'] / r['train_gb']:.3f}", file=sys.stderr, flush=True)
    return results


def table(results: list[dict[str, Any]], device: str) -> str:
    full = next((r for r in results if r["row"] == "full" and "error" not in r), None)
    cols = ["row", "estimate", "train", "est/meas", "weights", "grads", "optim", "activ"]
    cols += ["cuda_peak"] if device == "cuda" else []
    cols += ["est %full", "train %full"] + (["peak %full"] if device == "cuda" else [])
    lines = [cols]

    def gb(x: float | None) -> str:
        return "" if x is None else (f"{x:.2f}G" if x >= 1 else f"{x * 1024:.1f}M")

    def share(r: dict[str, Any], key: str) -> str:
        return f"{100 * r[key] / full[key]:.0f}%" if full and r.get(key) and full.get(key) else ""

    for r in results:
        if "error" in r:
            lines.append([r["row"], "failed: " + r["error"][:80]])
            continue
        line = [r["row"], gb(r["estimate_gb"]), gb(r["train_gb"]), f"{r['estimate_gb'] / r['train_gb']:.2f}"]
        line += [gb(r[f"{k}_gb"]) for k in ("weights", "grads", "optimizer", "activations")]
        line += [gb(r.get("cuda_peak_gb"))] if device == "cuda" else []
        line += [share(r, "estimate_gb"), share(r, "train_gb")]
        line += [share(r, "cuda_peak_gb")] if device == "cuda" else []
        lines.append(line)
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# ---- every method combination ------------------------------------------------------------------
#: ``--combinations --dtype bfloat16``: setting -> (model.dtype, train.bf16)
BF16_SETTINGS = {"bf16 weights": ("bfloat16", "true"), "autocast, fp32 weights": ("float32", "true")}


def run_combinations(args: argparse.Namespace, argv: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per setting, every allowed combination in a process of its own (``run_rows``)."""
    settings = BF16_SETTINGS if args.dtype == "bfloat16" else {args.dtype: (args.dtype, args.train_bf16)}
    from tokentune.methods import allowed_combinations

    names = ["+".join(c) for c in allowed_combinations()]
    out = {}
    for label, (dtype, bf16) in settings.items():
        print(f"{label}: model.dtype {dtype}, train.bf16 {bf16}", file=sys.stderr, flush=True)
        out[label] = run_rows(args, [*argv, "--dtype", dtype, "--train-bf16", bf16], names)
    return out


def combinations_table(by_setting: dict[str, list[dict[str, Any]]]) -> str:
    """| combination | per setting: estimate, train_gb, est/meas |, then the worst ratio per setting."""
    labels = list(by_setting)
    head = "| combination | " + " | ".join(f"{x}: estimate | train_gb | est/meas" for x in labels) + " |"
    lines = [head, "|" + " --- |" * (1 + 3 * len(labels))]
    worst = dict.fromkeys(labels, 0.0)
    for i, first in enumerate(by_setting[labels[0]]):
        cells = [first["row"]]
        for label in labels:
            r = by_setting[label][i]
            if "error" in r:
                cells += ["failed", r["error"][:60], ""]
                continue
            ratio = r["estimate_gb"] / r["train_gb"]
            worst[label] = max(worst[label], abs(ratio - 1))
            cells += [f"{r['estimate_gb'] * 1024:.2f} MB", f"{r['train_gb'] * 1024:.2f} MB", f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = ", ".join(f"{label}: {100 * w:.1f}%" for label, w in worst.items())
    return "\n".join(lines) + f"\nlargest deviation of est/meas from 1: {summary}"


# ---- the meter's cost -------------------------------------------------------------------------------
def overhead(args: argparse.Namespace) -> dict[str, Any]:
    from tokentune.config import RunConfig
    from tokentune.data import collate, load_splits
    from tokentune.memory import MemoryMeter
    from tokentune.methods import MethodStack, StepContext
    from tokentune.models import load_model, load_tokenizer

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig.from_dict(run_config(args, ["lora", "tokentune"], out))
    stack = MethodStack.of(cfg)
    model = stack.prepare(load_model(cfg.model, stack.load_kwargs(), device=device))
    model.train()
    train_ds, _ = load_splits(cfg.data, load_tokenizer(cfg.model), seed=0)
    batch = {k: v.to(device) for k, v in collate([train_ds[i] for i in range(args.batch)], 0).items()}
    opt = torch.optim.AdamW(stack.param_groups(model), lr=1e-4)
    meter = MemoryMeter(model, opt, device)

    def optimizer_step() -> float:
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    def steps(sampled: bool) -> list[float]:
        times = []
        for i in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            meter.start_step(sampled=sampled)
            ctx = StepContext(step=i, model=model, optimizer=opt, probe_batch=None, device=device,
                              autocast=None, world_size=1, rank=0)  # fmt: skip
            stack.step(
                ctx,
                [batch],
                backward=lambda loss: loss.backward(),
                optimizer_step=optimizer_step,
                forward_context=meter.saved_tensors,
                on_micro_batch=lambda b, _loss: meter.note_batch(b["input_ids"]),
            )
            meter.end_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    steps(False)  # warm-up: optimizer state, kernels
    off_all, on_all, ratios = [], [], []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {s: statistics.median(steps(s)) for s in order}
        off_all.append(got[False])
        on_all.append(got[True])
        ratios.append(got[True] / got[False])
    med = statistics.median(ratios)
    return {
        "step_s_unsampled": statistics.median(off_all),
        "step_s_sampled": statistics.median(on_all),
        "sampled_over_unsampled_median": med,
        "sampled_over_unsampled_min": min(ratios),
        "sampled_over_unsampled_max": max(ratios),
        "amortised_overhead_log_every_10": (med - 1) / 10,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a real architecture (overrides the size flags)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; the preset's)")
    p.add_argument("--batch", type=int, default=None, help="default 1 (--combinations: 2)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda")
    p.add_argument(
        "--train-bf16", choices=["auto", "true", "false"], default="auto", help="train.bf16 (autocast)"
    )
    p.add_argument("--model", default=None, help="a model path instead of a random Llama of the size flags")
    p.add_argument(
        "--combinations",
        action="store_true",
        help="every allowed method combination on the shipped tiny model (--dtype bfloat16: two bf16 settings)",
    )
    p.add_argument("--ratio", type=float, default=0.3, help="TokenTune's selection ratio")
    p.add_argument("--budget", type=float, default=0.25, help="IST/RST's layer budget (a fraction)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sparse-steps", type=int, default=12, help="steps of the IST/RST rows")
    p.add_argument("--rows", type=lambda s: s.split(","), default=list(ROWS), help=",".join(ROWS))
    p.add_argument("--overhead", action="store_true", help="measure the meter's cost on step time")
    p.add_argument("--rounds", type=int, default=7, help="--overhead: interleaved rounds")
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "tokentune-bench"))
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--build-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.combinations:
        from tokentune import assets

        args.model = args.model or str(assets.default_model_path())
        args.seq, args.batch = args.seq or 128, args.batch or 2
    args.batch = args.batch or 1
    for k, v in (PRESETS.get(args.preset) or {}).items():
        if k == "seq":
            args.seq = args.seq or v
        elif k != "dtype" or args.dtype is None:
            setattr(args, k, v)
    args.seq = args.seq or 512
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.intermediate = int(round(args.hidden * 2.6875 / 16) * 16) if not args.preset else args.intermediate
    args.kv_heads = args.kv_heads or args.heads
    from tokentune import assets

    tokens = json.loads((assets.default_model_path() / "config.json").read_text())["vocab_size"]
    if args.vocab < tokens:
        p.error(f"--vocab {args.vocab}: at least {tokens} (the shipped tokenizer's size; its ids must fit)")
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.row:
        print(json.dumps(measure_row(args, args.row)), flush=True)
        return 0
    if args.build_checkpoint:
        checkpoint_dir(args)
        return 0
    shape = f"Llama {args.layers} x {args.hidden} (heads {args.heads}/{args.kv_heads}, vocab {args.vocab})"
    shape = args.model or shape
    print(f"{shape}, seq {args.seq}, batch {args.batch}, {args.dtype} on {args.device}", flush=True)
    if args.combinations:
        print(combinations_table(run_combinations(args, argv)))
        return 0
    if not args.model:  # saved once, by a process of its own: the parent never holds the device
        subprocess.run([sys.executable, __file__, *argv, "--build-checkpoint"], check=True)
    if args.overhead:
        res = overhead(args)
        print(
            "step (median)   unsampled  sampled   sampled/unsampled: median [min, max] over rounds   "
            "amortised (log_every 10)\n"
            f"lora+tokentune  {res['step_s_unsampled']:.4f}s    {res['step_s_sampled']:.4f}s   "
            f"{res['sampled_over_unsampled_median']:.3f} [{res['sampled_over_unsampled_min']:.3f}, "
            f"{res['sampled_over_unsampled_max']:.3f}] ({args.rounds} rounds)"
            f"{'':20s}{100 * res['amortised_overhead_log_every_10']:+.2f}%"
        )
        if args.json:
            print(json.dumps(res))
        return 0
    results = run_rows(args, argv)
    print(table(results, args.device))
    if args.json:
        for r in results:
            print(json.dumps(r))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
