"""LoRA vs IST vs RST: saved activations, step time and probe overhead on a random Llama.

    python bench/ist_bench.py [--layers 8] [--hidden 512] [--seq 256] [--steps 20] [--batch 16] [--json]

Every configuration trains its own copy of the same random model with LoRA (r=8, alpha=16 on
q,k,v,up,down as in the IST paper) through a ``MethodStack`` (the hook sequence of ``tokentune.train``); IST uses the paper's
probing (every 10 steps from step 10, K=3 suppression sets, 16 probe examples). Steps run round-robin
over the configurations so that a busy machine slows all of them alike.

- saved_bytes_mean / _peak: bytes autograd saved for backward during one step's forward (mean and
  max over steps), deduplicated by storage, model parameters excluded (they cost no extra memory).
- step_s: median training-step time plus the mean probe round / ``update_every`` (IST), i.e. the
  wall time per optimizer step including probing; step_s_train is the median without it.
- probe_share: the share of wall time spent probing in the steady state (one probe round per
  ``update_every`` steps): amortised probe time / step_s.
- step_cpu_s / probe_share_cpu: the same on the process-CPU clock. On a shared machine wall time is
  dominated by waiting for a core; with ``--threads 1`` CPU time measures the work itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tokentune.methods import MethodStack, StepContext  # noqa: E402
from tokentune.methods.ist.method import IST, RST, ISTSettings, RSTSettings  # noqa: E402
from tokentune.methods.lora import LoRA, LoraSettings  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
UPDATE_EVERY, START_STEP = 10, 10  # IST paper: probe every 10 steps from step 10


def build_model(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def make_batch(i: int, batch: int, args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + i)
    ids = torch.randint(3, args.vocab, (batch, args.seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class SavedBytes:
    """Bytes saved for backward inside the context, one count per storage, parameters excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.param_storages:
            self.seen[s.data_ptr()] = max(self.seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    def __enter__(self):
        self.seen.clear()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


@dataclass
class Run:
    method: str
    budget: float | None
    model: torch.nn.Module
    methods: MethodStack
    optimizer: torch.optim.Optimizer
    saved: list[int] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # wall
    probe_s: list[float] = field(default_factory=list)
    step_cpu: list[float] = field(default_factory=list)  # process CPU time (robust on a shared machine)
    probe_cpu: list[float] = field(default_factory=list)


def make_run(method: str, budget: float | None, args) -> Run:
    methods: list = [LoRA(LoraSettings(rank=8, alpha=16, target_modules=TARGETS))]
    if method == "ist":
        methods.append(
            IST(
                ISTSettings(
                    budget=budget,
                    update_every=UPDATE_EVERY,
                    start_step=START_STEP,
                    probe_sets=3,
                    probe_batch_size=16,
                )
            )
        )
    elif method == "rst":
        methods.append(RST(RSTSettings(budget=budget)))
    stack = MethodStack(methods)
    model = stack.prepare(build_model(args))
    model.train()
    optimizer = torch.optim.AdamW(stack.param_groups(model), lr=2e-4, weight_decay=0.0)
    return Run(method, budget, model, stack, optimizer)


def train_step(run: Run, step: int, args) -> None:
    model = run.model
    ctx = StepContext(
        step=step,
        model=model,
        optimizer=run.optimizer,
        probe_batch=lambda size: make_batch(-1 - step, size, args),
    )
    saved = SavedBytes(model)
    clock: dict[str, float] = {}

    def optimizer_step() -> float:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        clock["trained"] = time.process_time()  # what follows is IST's probe (on_step_end)
        return float(norm)

    t0, c0 = time.perf_counter(), time.process_time()
    run.methods.step(
        ctx,
        [make_batch(step, args.batch, args)],
        backward=lambda loss: loss.backward(),
        optimizer_step=optimizer_step,
        forward_context=lambda: saved,
    )
    c2 = time.process_time()
    run.step_s.append(time.perf_counter() - t0)
    run.step_cpu.append(c2 - c0)
    run.saved.append(saved.total)
    run.probe_s.append(sum(getattr(m, "probe_s", 0.0) for m in run.methods))
    run.probe_cpu.append(c2 - clock["trained"] if run.probe_s[-1] > 0 else 0.0)


def _clock(steps: list[float], probes: list[float], every: int) -> tuple[float, float, float]:
    """(median training step, step with probing amortised, probe share of the steady state).

    One probe round runs every ``every`` steps, so a step costs the median training step plus the
    mean probe round / ``every``; the probe share is that amortised part over the total.
    """
    train = statistics.median(s - p for s, p in zip(steps, probes))
    rounds = [p for p in probes if p > 0]
    per_step = statistics.mean(rounds) / every if rounds else 0.0
    return train, train + per_step, per_step / (train + per_step)


def summarise(run: Run, every: int = UPDATE_EVERY) -> dict:
    train, step, share = _clock(run.step_s, run.probe_s, every)
    train_cpu, step_cpu, share_cpu = _clock(run.step_cpu, run.probe_cpu, every)
    return {
        "method": run.method,
        "budget": run.budget,
        "saved_bytes_mean": statistics.mean(run.saved),
        "saved_bytes_peak": max(run.saved),
        "step_s": step,
        "probe_share": share,
        "step_s_train": train,
        "step_cpu_s": step_cpu,
        "step_cpu_s_train": train_cpu,
        "probe_share_cpu": share_cpu,
        "probe_rounds": sum(1 for p in run.probe_s if p > 0),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="training micro-batch (IST paper: 16)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps <= START_STEP:
        print(
            f"note: IST probes from step {START_STEP}; use --steps > {START_STEP} to include probing",
            file=sys.stderr,
        )

    runs = [make_run("lora", None, args)]
    runs += [make_run(m, b, args) for m in ("ist", "rst") for b in args.budgets]
    for step in range(args.steps):  # round-robin: machine noise hits every configuration alike
        for run in runs:
            train_step(run, step, args)
        print(f"step {step + 1}/{args.steps} done", file=sys.stderr, flush=True)
    rows = [summarise(r) for r in runs]
    base = rows[0]
    for r in rows:
        r["step_vs_lora"] = r["step_s"] / base["step_s"]
        r["step_cpu_vs_lora"] = r["step_cpu_s"] / base["step_cpu_s"]
        r["saved_vs_lora"] = r["saved_bytes_mean"] / base["saved_bytes_mean"]

    if args.json:
        for r in rows:
            print(json.dumps(r))
        return rows
    print(
        f"layers={args.layers} hidden={args.hidden} seq={args.seq} batch={args.batch} steps={args.steps} "
        f"threads={torch.get_num_threads()} (IST: probe every 10 steps from 10, K=3, 16 examples)"
    )
    head = (
        f"{'method':<6} {'budget':>6} | {'saved MiB':>9} {'peak':>7} {'vs LoRA':>7} | {'wall s':>7} "
        f"{'vs LoRA':>7} {'probe%':>6} | {'cpu s':>7} {'vs LoRA':>7} {'probe%':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        print(
            f"{r['method']:<6} {budget:>6} | {r['saved_bytes_mean'] / 2**20:>9.1f} "
            f"{r['saved_bytes_peak'] / 2**20:>7.1f} {r['saved_vs_lora']:>7.2f} | {r['step_s']:>7.3f} "
            f"{r['step_vs_lora']:>7.2f} {100 * r['probe_share']:>5.1f}% | {r['step_cpu_s']:>7.3f} "
            f"{r['step_cpu_vs_lora']:>7.2f} {100 * r['probe_share_cpu']:>5.1f}%"
        )
    print(
        "saved: bytes saved for backward per step (mean, peak), storages deduplicated, parameters excluded; "
        "s: time per optimizer step incl. amortised probing (median training step + probe round / 10); "
        "probe%: steady-state share of time spent probing (wall and process-CPU clocks)"
    )
    return rows


if __name__ == "__main__":
    main()
