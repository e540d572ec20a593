"""Benchmark the training methods: memory saved for backward, peak memory and step time.

    python bench/methods.py                         # CPU: 4-layer Llama, hidden 512, seq 1024
    python bench/methods.py --json                  # one JSON object per row as well
    python bench/methods.py --device cuda --preset llama2-7b --modes lora,qlora
    python bench/methods.py --device cuda --preset llama2-7b --modes full --optim sgd   # AdamW state: > 80 GB
    python bench/methods.py --threads 1             # steadier CPU timings on a shared machine
    python bench/methods.py --modes lora --variants stock,ist,rst   # IST/RST at budgets 25%, 50% vs LoRA
    python bench/methods.py --modes lora --variants stock,checkpointing,tokentune,tokentune+checkpointing

A row is one (mode, variant, ratio): ``mode`` picks the trainer (lora, full, qlora = 4-bit base +
LoRA), a variant adds methods on top (``stock``: none; ``tokentune``: TokenTune at each ratio;
``ist`` / ``rst``: a layer-update budget, the ``ratio`` column then being the budget;
``checkpointing`` / ``tokentune+checkpointing``: stock / TokenTune with every layer checkpointed).
Every row builds a Llama-architecture model with random weights and trains it through a
``MethodStack`` of the registered methods (the object that runs ``tokentune.train``'s hook sequence)
on one fixed micro-batch (batch 1, no padding, every token labelled). To add a row kind,
append a ``Variant`` to ``VARIANTS``: a name, a function giving the method names and configs for a
mode and ratio, and the ratios it sweeps.

Figures (each row runs in a fresh subprocess unless ``--no-isolate``):
- ``saved_bytes``: bytes autograd saves for backward during a training step's forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage; ``saved_act_bytes``: the
  same without storages that belong to model parameters or buffers (weights saved to compute input
  gradients), i.e. the activations. The table shows ``saved_act_bytes``. IST/RST rows average 8
  steps (``saved_act_peak_bytes``: the largest), since each step trains different layers.
- ``peak_bytes``: peak memory while training steps run, above the memory held just before the
  first step (model weights, inputs). On CUDA: ``max_memory_allocated`` minus ``memory_allocated``
  before the steps (``peak_total_bytes``: ``max_memory_allocated`` itself). On CPU: the process's
  peak resident set size (VmHWM, reset through /proc/self/clear_refs before the steps) minus its
  resident set size before the steps; glibc is told to return freed blocks to the system at once
  (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_), so the RSS follows live memory. It includes
  gradients, optimizer state (created at the first step) and temporaries, so it moves less than
  the saved activations.
- ``step_s``: median wall time of ``--steps`` optimizer steps (forward + backward + optimizer step)
  after ``--warmup`` steps; ``step_cpu_s``: the median CPU time of this process (all its threads)
  over the same steps, which other load on a shared machine disturbs less than wall time. IST rows
  measure 10 steps holding one probe round (the paper's schedule: every 10 steps, K=3 sets, a probe
  batch the size of the training batch): ``step_s`` is the median training step plus the round's
  time spread over the 10 steps, ``probe_share`` that spread part over ``step_s`` (``step_cpu_s``
  leaves probing out). ``bench/ist_bench.py`` measures the same at the IST paper's batch sizes.
- ``step_cost_est`` (column ``est x``): the step-cost estimate of the row's methods over its mode's
  stock step (``tokentune.timing.relative_step_cost``: multiply-accumulates per token), to compare with
  the measured ``x stock`` of ``step s`` and ``cpu s``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if TYPE_CHECKING:
    from tokentune.methods import MethodStack

PRESETS: dict[str, dict[str, Any]] = {
    # Llama-2-7B's architecture (random weights), bf16, the paper's max length
    "llama2-7b": dict(
        hidden=4096,
        intermediate=11008,
        layers=32,
        heads=32,
        kv_heads=32,
        vocab=32000,
        seq=2048,
        dtype="bfloat16",
    ),
}
MODE_METHODS = {"lora": ["lora"], "full": ["full"], "qlora": ["qlora", "lora"]}


# ---- variants: which methods a row trains with ---------------------------------------------------
@dataclass
class Variant:
    name: str
    methods: Callable[[argparse.Namespace, str, float | None], tuple[list[str], dict[str, Any]]]
    ratios: Callable[[argparse.Namespace], list[float | None]] = field(default=lambda args: [None])
    modes: tuple[str, ...] | None = None  # the trainer modes it applies to (None: all)


def trainer_configs(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if mode in ("lora", "qlora"):
        cfg["lora"] = {"rank": args.lora_rank}
        if args.lora_targets:
            cfg["lora"]["target_modules"] = args.lora_targets.split(",")
    if mode == "qlora":
        cfg["qlora"] = {"compute_dtype": "bfloat16" if args.dtype == "bfloat16" else "float32"}
    return cfg


def stock_methods(args, mode, ratio):
    return list(MODE_METHODS[mode]), trainer_configs(args, mode)


def tokentune_methods(args, mode, ratio):
    return [*MODE_METHODS[mode], "tokentune"], {**trainer_configs(args, mode), "tokentune": {"ratio": ratio}}


def checkpointed(variant):
    """A variant's methods with every decoder layer checkpointed (``checkpointing``) on top."""

    def methods(args, mode, ratio):
        names, configs = variant(args, mode, ratio)
        return [*names, "checkpointing"], configs

    return methods


#: IST probes every ``IST_UPDATE_EVERY`` steps, from the first measured step: the measured window of an
#: IST row is that many steps, so it holds exactly one probe round (the paper's schedule, amortised).
IST_UPDATE_EVERY = 10


def layer_budget_methods(name: str):
    """IST or RST on top of the mode's trainer; the row's ``ratio`` is the layer budget (a fraction)."""

    def methods(args, mode, budget):
        cfg: dict[str, Any] = {"budget": budget, "seed": 0}
        if name == "ist":
            cfg.update(update_every=IST_UPDATE_EVERY, start_step=args.warmup, probe_batch_size=args.batch)
        return [*MODE_METHODS[mode], name], {**trainer_configs(args, mode), name: cfg}

    return methods


VARIANTS: list[Variant] = [
    Variant("stock", stock_methods),
    Variant("tokentune", tokentune_methods, ratios=lambda args: list(args.ratios)),
    Variant("checkpointing", checkpointed(stock_methods)),
    Variant(
        "tokentune+checkpointing",
        checkpointed(tokentune_methods),
        ratios=lambda args: list(args.ratios),
    ),
    Variant(
        "ist", layer_budget_methods("ist"), ratios=lambda args: list(args.budgets), modes=("lora", "qlora")
    ),
    Variant(
        "rst", layer_budget_methods("rst"), ratios=lambda args: list(args.budgets), modes=("lora", "qlora")
    ),
]
DEFAULT_VARIANTS = ["stock", "tokentune"]


# ---- building a row ----------------------------------------------------------------------------
def model_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 2048),
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    cfg._attn_implementation = "sdpa"  # the kernel TokenTune uses: same for the baseline
    return cfg


def checkpoint_dir(args: argparse.Namespace) -> Path:
    """A random model saved once (QLoRA loads it quantized, as training would)."""
    key = f"llama-{args.layers}x{args.hidden}-{args.intermediate}-{args.heads}-{args.kv_heads}-{args.vocab}-{args.dtype}"
    path = Path(args.cache_dir) / key
    if not (path / "config.json").exists():
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM._from_config(model_config(args), dtype=getattr(torch, args.dtype))
        model.save_pretrained(path)
        del model
    return path


def build_model(args: argparse.Namespace, load_kwargs: dict[str, Any]):
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if load_kwargs:  # a quantized base: load the saved random model through from_pretrained
        device_map = {"": 0} if args.device == "cuda" else {"": "cpu"}
        return LlamaForCausalLM.from_pretrained(
            checkpoint_dir(args), dtype=dtype, device_map=device_map, **load_kwargs
        )
    torch.manual_seed(0)
    with torch.device(args.device):
        return LlamaForCausalLM._from_config(model_config(args), dtype=dtype)


@dataclass
class Trial:
    """A prepared row: the model, its methods and one optimizer step (``step(batch, pack=None)`` -> loss;
    ``pack`` is a saved-tensor hook that sees what the step's forward saves for backward)."""

    model: torch.nn.Module
    step: Callable[..., float]
    methods: MethodStack


def build_trial(args: argparse.Namespace, names: list[str], configs: dict[str, Any]) -> Trial:
    from tokentune.methods import MethodStack, StepContext

    stack = MethodStack.build(names, configs)
    model = stack.prepare(build_model(args, stack.load_kwargs()))
    model.train()
    groups = stack.param_groups(model)  # IST/RST: one group per layer
    opt = (
        torch.optim.AdamW(groups, lr=1e-5)
        if args.optim == "adamw"
        else torch.optim.SGD(groups, lr=1e-5)  # no optimizer state: full fine-tuning of 7B on one GPU
    )
    device = torch.device(args.device)
    counter = [0]

    def probe_batch(size: int | None = None) -> dict[str, torch.Tensor]:  # IST's probe data
        return make_batch(args, size=size, seed=1000 + counter[0])

    def optimizer_step() -> float:
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    def step(batch, pack=None) -> float:
        ctx = StepContext(step=counter[0], model=model, optimizer=opt, probe_batch=probe_batch, device=device)
        saved_tensors = (  # count what this training forward saves for backward
            contextlib.nullcontext
            if pack is None
            else lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        )
        loss, _ = stack.step(
            ctx,
            [batch],
            backward=lambda loss: loss.backward(),
            optimizer_step=optimizer_step,
            forward_context=saved_tensors,
        )
        counter[0] += 1
        return loss

    return Trial(model, step, stack)


# ---- measurement harness -------------------------------------------------------------------------
def count_saved(trial: Trial, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(all bytes, activation bytes) saved for backward by one training step's forward (after the
    methods' step-start hooks: IST/RST pick the step's layers there), deduplicated by storage."""
    weights = {t.untyped_storage().data_ptr() for t in (*trial.model.parameters(), *trial.model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without a storage
            pass
        return t

    trial.step(batch, pack)
    total = sum(seen.values())
    return total, total - sum(n for ptr, n in seen.items() if ptr in weights)


def _rss(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the level at ``start()`` (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = "cuda-max-allocated" if device == "cuda" else "rss-hwm"

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        import gc

        gc.collect()
        self.base = _rss("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            self.method = "rss-lifetime-peak"  # peak since process start (a fresh process per row)

    def stop(self) -> tuple[int, int]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return peak - self.base, peak
        peak = _rss("VmHWM")
        return peak - self.base, peak


def estimated_step_cost(args: argparse.Namespace, names: list[str], configs: dict[str, Any]) -> float:
    """``tokentune.timing.relative_step_cost`` of a row: its step over its mode's stock step, estimated."""
    from tokentune.config import RunConfig
    from tokentune.shape import ModelShape
    from tokentune.timing import relative_step_cost

    cfg = RunConfig.from_dict(
        {"methods": names, **configs, "data": {"max_length": args.seq}, "train": {"batch_size": args.batch}}
    )
    shape = ModelShape(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
    return relative_step_cost(cfg, shape)


def make_batch(args: argparse.Namespace, size: int | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, args.vocab, (size or args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(args.device) for k, v in batch.items()}


def measure(args: argparse.Namespace, mode: str, variant: Variant, ratio: float | None) -> dict[str, Any]:
    names, configs = variant.methods(args, mode, ratio)
    trial = build_trial(args, names, configs)
    batch = make_batch(args)
    # layer-budget rows save a different amount each step (the lowest active layer moves): average
    counts = [count_saved(trial, batch) for _ in range(8 if any(n in names for n in ("ist", "rst")) else 1)]
    saved, saved_act = (round(statistics.mean(c[i] for c in counts)) for i in (0, 1))
    saved_act_peak = max(c[1] for c in counts)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    peak = PeakMemory(args.device)
    peak.start()
    times, cpu_times, losses, probes = [], [], [], []
    steps = max(args.steps, IST_UPDATE_EVERY) if "ist" in names else args.steps
    for _ in range(args.warmup + steps):
        sync()
        t, c = time.perf_counter(), time.process_time()
        losses.append(trial.step(batch))
        sync()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        probes.append(sum(getattr(m, "probe_s", 0.0) for m in trial.methods))
    peak_bytes, peak_total = peak.stop()
    # a step = the median training step + the window's probing spread over its steps (IST; else 0)
    probe = probes[args.warmup :]
    train_only = [t - p for t, p in zip(times[args.warmup :], probe)]
    step_s = statistics.median(train_only) + sum(probe) / len(probe)
    return {
        "method": variant.name,
        "mode": mode,
        "methods": names,
        "ratio": ratio,
        "seq_len": args.seq,
        "batch": args.batch,
        "layers": args.layers,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "device": args.device,
        "saved_bytes": saved,
        "saved_act_bytes": saved_act,
        "saved_act_peak_bytes": saved_act_peak,
        "peak_bytes": peak_bytes,
        "peak_total_bytes": peak_total,
        "peak_method": peak.method,
        "step_s": step_s,
        "probe_share": (sum(probe) / len(probe)) / step_s,
        "step_cpu_s": statistics.median(cpu_times[args.warmup :]),
        "step_cost_est": estimated_step_cost(args, names, configs),
        "threads": torch.get_num_threads(),
        "loss": losses[-1],
    }


# ---- driver --------------------------------------------------------------------------------------
def rows(args: argparse.Namespace) -> list[tuple[str, Variant, float | None]]:
    by_name = {v.name: v for v in VARIANTS}
    chosen = [by_name[n] for n in (args.variants or DEFAULT_VARIANTS)]
    return [
        (mode, v, r)
        for mode in args.modes
        for v in chosen
        if v.modes is None or mode in v.modes
        for r in v.ratios(args)
    ]


def run_isolated(argv: list[str], mode: str, variant: Variant, ratio: float | None) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    spec = json.dumps([mode, variant.name, ratio])
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_row", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"row {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    mb = 2**20
    w = max(10, *(len(r["method"]) for r in results))  # the method column fits its longest name
    head = (
        f"{'mode':<6} {'method':<{w}} {'ratio':>5} | {'saved act MB':>12} {'x stock':>7} | "
        f"{'saved all MB':>12} {'x stock':>7} | {'peak MB':>8} {'x stock':>7} | {'step s':>7} {'x stock':>7} | {'cpu s':>7} {'x stock':>7} {'est x':>6} | probe"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        base = next((s for s in results if s["mode"] == r["mode"] and s["method"] == "stock"), None)

        def rel(key, r=r, base=base):
            return f"{r[key] / base[key]:7.2f}" if base and base[key] > 0 else f"{'-':>7}"

        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"{r['mode']:<6} {r['method']:<{w}} {ratio:>5} | {r['saved_act_bytes'] / mb:12.1f} {rel('saved_act_bytes')} | "
            f"{r['saved_bytes'] / mb:12.1f} {rel('saved_bytes')} | {r['peak_bytes'] / mb:8.1f} {rel('peak_bytes')} | "
            f"{r['step_s']:7.3f} {rel('step_s')} | {r['step_cpu_s']:7.3f} {rel('step_cpu_s')} "
            f"{r.get('step_cost_est', float('nan')):6.2f} | "
            f"{100 * r.get('probe_share', 0.0):4.1f}%"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a real architecture (overrides the size flags)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=None, help="default: Llama's 2.6875 x hidden")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA, as Llama-2-7B)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.3, 0.5, 1.0])
    p.add_argument("--modes", type=lambda s: s.split(","), default=["lora", "full"])
    p.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=None,
        help="rows to run: stock, tokentune (at --ratios), ist, rst (at --budgets; lora/qlora modes only); "
        "default: stock,tokentune",
    )
    p.add_argument(
        "--budgets",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.25, 0.5],
        help="IST/RST layer budgets, fractions of the layers (default: 0.25,0.5)",
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--optim", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default=None, help="comma-separated; default: the lora method's default")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "tokentune-bench"))
    p.add_argument("--json", action="store_true", help="also print one JSON object per row")
    p.add_argument(
        "--no-isolate", action="store_true", help="all rows in this process (peak memory is then unreliable)"
    )
    p.add_argument("--_row", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preset:
        preset = PRESETS[args.preset]
        for k, v in preset.items():
            if k != "dtype" or args.dtype is None:
                setattr(args, k, v)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.intermediate = args.intermediate or int(round(args.hidden * 2.6875 / 16) * 16)
    args.kv_heads = args.kv_heads or args.heads
    unknown = [m for m in args.modes if m not in MODE_METHODS]
    if unknown:
        p.error(f"--modes: unknown {unknown}; known: {', '.join(MODE_METHODS)}")
    if args.variants and (bad := [v for v in args.variants if v not in {x.name for x in VARIANTS}]):
        p.error(f"--variants: unknown {bad}; known: {', '.join(v.name for v in VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._row:  # a child process: one row, one JSON line
        mode, name, ratio = json.loads(args._row)
        variant = next(v for v in VARIANTS if v.name == name)
        print(json.dumps(measure(args, mode, variant, ratio)))
        return
    if "qlora" in args.modes:
        checkpoint_dir(args)  # save the random model once, before the rows
    results = []
    for mode, variant, ratio in rows(args):
        r = (
            measure(args, mode, variant, ratio)
            if args.no_isolate
            else run_isolated(argv, mode, variant, ratio)
        )
        results.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(
                f"  {mode} {variant.name} ratio={ratio}: step {r['step_s']:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    size = (
        f"{args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}"
    )
    print(
        f"\nLlama ({size}), seq {args.seq}, batch {args.batch}, {args.dtype} on {args.device}",
        file=sys.stderr,
    )
    print(table(results), file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
