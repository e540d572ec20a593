"""The device check in one command, for a GPU machine that cannot download anything.

    bash bench/gpu_check.sh                 # on the GPU machine: about 6-8 minutes on one H100/H200
    bash bench/gpu_check.sh --dry           # on any CPU machine: every step that needs no CUDA (~1 min)
    OUT=/some/dir bash bench/gpu_check.sh   # where the summary goes (default ./gpu_check_out)

It needs what the lent GPU machine has (CUDA torch, transformers, peft, accelerate, pytest) and only
``tokentune/`` (no Ray, MLflow or lm-eval). Steps, in order, each with its own time limit (all of them
within ``--budget`` seconds, 480 by default):

1. ``env``: torch, CUDA device, and which optional packages import (bitsandbytes, deepspeed, ray, ...).
2. ``attention``: TokenTune's split forward and the stock forward on the tiny GQA model (4 query / 2
   key-value heads), padded batch: their sdpa calls agree (transformers' GQA rule), and on CUDA a
   forward + backward of each runs with the math kernel disabled (so neither falls back to it).
   ``--dry``: the same call comparison under the simulated CUDA decision.
3. ``gpu tests``: ``pytest -m gpu`` (``tests/test_gpu.py``; QLoRA cases skip without bitsandbytes).
   ``--dry``: collected only.
4. ``memory 7B``: ``bench/memory.py --device cuda --preset llama2-7b`` (QLoRA rows only with
   bitsandbytes). ``--dry``: the same script on CPU with a tiny Llama and one step.
5. ``deepspeed``: one ZeRO-2 bf16 LoRA run of ``tokentune train`` in this process, only when deepspeed
   imports. ``--dry``: its config resolved (``--print-config``).

Wheels for the optional rows travel in ``bench/wheels/`` (see ``bench/gpu_check.sh``). Writes
``summary.md`` (the table), ``summary.json`` and each step's log to the output folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("bitsandbytes", "deepspeed", "ray", "mlflow", "lm_eval")
STEP_LIMITS_S = {"env": 30, "attention": 90, "gpu tests": 150, "memory 7B": 330, "deepspeed": 120}


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run_step(name: str, cmd: list[str], out: Path, limit_s: float, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` (from the repository root) with a time limit; its output goes to ``<out>/<name>.log``."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(1.0, limit_s),
            env={**os.environ, **(env or {})},
        )
        text, note = proc.stdout + proc.stderr, _last_line(proc.stdout) or _last_line(proc.stderr)
        status = "pass" if proc.returncode == 0 else f"fail (rc {proc.returncode})"
    except subprocess.TimeoutExpired as err:
        text = _text(err.stdout) + _text(err.stderr)
        note, status = _last_line(text), f"fail (over {limit_s:.0f} s)"
    (out / f"{name.replace(' ', '_')}.log").write_text(text)
    return {"step": name, "status": status, "seconds": round(time.monotonic() - t0, 1), "note": note[:160]}


def _text(x: str | bytes | None) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _last_line(text: str) -> str:
    return ([line for line in text.splitlines() if line.strip()][-1:] or [""])[0]


def skipped(name: str, why: str) -> dict:
    return {"step": name, "status": "skipped", "seconds": 0.0, "note": why}


def memory_cmd(dry: bool, have_bnb: bool) -> list[str]:
    rows = ["full", "lora", "qlora", "lora+tokentune", "qlora+tokentune", "lora+ist"]
    if not have_bnb:
        rows = [r for r in rows if not r.startswith("qlora")]
    cmd = [sys.executable, "bench/memory.py", "--json"]
    if dry:  # the same script on CPU, one row at a size that runs in seconds
        tiny = "--layers 2 --hidden 64 --heads 4 --kv-heads 2 --vocab 2048 --seq 64 --steps 1"
        return [*cmd, "--rows", "lora+tokentune", "--device", "cpu", *tiny.split()]
    paper = "--device cuda --preset llama2-7b --seq 2048 --batch 1 --steps 2"
    return [*cmd, "--rows", ",".join(rows), *paper.split()]


def deepspeed_cmd(out: Path, dry: bool) -> list[str]:
    cmd = [sys.executable, "-m", "tokentune.cli", "train", "--zero", "2", "--output-dir", str(out / "ds_run"),
           "--set", "methods=[lora]", "--set", "train.max_steps=3", "--set", "train.bf16=true",
           "--set", "compute.use_gpu=" + ("false" if dry else "true")]  # fmt: skip
    return [*cmd, "--print-config"] if dry else cmd


def steps(out: Path, dry: bool) -> list[tuple[str, list[str] | None, str, dict[str, str]]]:
    """(name, command or None, why it is skipped, extra environment) per step, in order."""
    py = sys.executable
    have_bnb, have_ds = importable("bitsandbytes"), importable("deepspeed")
    ds_env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
    }
    if not dry:
        ds_env["DS_ACCELERATOR"] = "cuda"
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"]
    return [
        ("env", [py, str(Path(__file__)), "--env"], "", {}),
        ("attention", [py, "-m", "bench.attention_probe", *(["--dry"] if dry else [])], "", {}),
        ("gpu tests", [*tests, "--collect-only"] if dry else tests, "", {}),
        ("memory 7B", memory_cmd(dry, have_bnb), "", {}),
        ("deepspeed", deepspeed_cmd(out, dry) if have_ds else None, "deepspeed does not import", ds_env),
    ]


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
    info.update({name: importable(name) for name in OPTIONAL})
    return info


def table(rows: list[dict]) -> str:
    lines = ["| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


MEMORY_COLUMNS = ("estimate_gb", "train_gb", "cuda_peak_gb", "cuda_reserved_gb")


def memory_rows(out: Path) -> list[dict]:
    """The JSON rows ``bench/memory.py --json`` printed in the memory step's log."""
    log = out / "memory_7B.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    return [json.loads(line) for line in lines if line.startswith('{"row"')]


def memory_table(rows: list[dict]) -> str:
    """Per row: the estimate and what was measured (GB), and its share of the ``full`` row's."""
    full = next((r for r in rows if r["row"] == "full"), {})
    cols = [c for c in MEMORY_COLUMNS if any(c in r for r in rows)]
    lines = ["| row | " + " | ".join(cols) + " | est/meas | share of full (train / cuda_peak) |"]
    lines.append("| --- " * (len(cols) + 3) + "|")
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in cols]
        ratio = (
            f"{r['estimate_gb'] / r['train_gb']:.2f}" if r.get("train_gb") and r.get("estimate_gb") else "-"
        )
        shares = [
            f"{100 * r[c] / full[c]:.0f}%" for c in ("train_gb", "cuda_peak_gb") if r.get(c) and full.get(c)
        ]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {ratio} | {' / '.join(shares) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="run on CPU every step that does not need CUDA")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="summary folder ($OUT)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps together")
    p.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.env:
        print(json.dumps(environment()))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    results = []
    for name, cmd, why, env in steps(out, args.dry):
        left = deadline - time.monotonic()
        if cmd is None or left < 5:
            results.append(skipped(name, why or f"no time left of --budget {args.budget:g} s"))
        else:
            results.append(run_step(name, cmd, out, min(STEP_LIMITS_S[name], left), env))
        print(
            f"{name}: {results[-1]['status']} ({results[-1]['seconds']} s) {results[-1]['note']}", flush=True
        )
    text = f"# GPU check ({'dry, CPU' if args.dry else 'CUDA'})\n\n" + table(results)
    memory = memory_rows(out)
    if memory:  # the paper (Llama-2-7B, seq 2048): QLoRA ~37%, QLoRA + TokenTune ~21% of full
        text += "\n## Memory per row (GB)\n\n" + memory_table(memory)
    (out / "summary.md").write_text(text)
    summary = {"dry": args.dry, "steps": results, "memory": memory}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)
    return 0 if all(r["status"] in ("pass", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
