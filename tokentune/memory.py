"""What a training worker holds in memory, measured: the breakdown every run reports, and tokens/s.

    meter = MemoryMeter(model, optimizer, device)     # the client optimizer (also under DeepSpeed)
    meter.start_step(sampled=True)                    # before a step the breakdown is measured on
    with meter.saved_tensors(): loss = forward(...)   # per micro-batch (``MethodStack.step``'s forward_context)
    meter.end_step()
    meter.metrics()   # {"memory/weights_gb": ..., "memory/train_gb": ..., "memory/process_rss_gb": ...}

The breakdown, per worker, in GB (2**30 bytes), each tensor counted once by its storage:

- ``weights``: the parameters and buffers this worker holds (4-bit weights at their packed size;
  under ZeRO-3 the partition, plus the small parameters ZeRO-3 keeps whole);
- ``grads``: the gradients alive when the optimizer steps (the model's ``.grad`` and, under ZeRO,
  the flat gradient partition the optimizer applies); DeepSpeed's communication buckets are not counted;
- ``optimizer``: the optimizer's state tensors after the step, plus its own copies of the weights
  (ZeRO's fp32 partitions), this worker's share;
- ``activations``: the bytes autograd saves for backward during one micro-batch's forward (logits
  and loss included, parameters excluded), counted with saved-tensor hooks; the largest micro-batch.
  Each storage counts once, and each counted tensor is held until that forward ends, so a saved
  temporary freed mid-forward cannot hide a later one at the same address (without this the count
  drifted with the allocator's history: 15.0 -> 14.0 -> 12.4 MB for the same DoRA+TokenTune run in
  one process). The price: on a sampled step those temporaries stay alive to the forward's end, so
  they count here and can raise ``cuda_peak_gb`` by as much;
- ``train``: their sum, what an accelerator needs besides the framework's runtime and buffers;
- ``host``: of the four, the bytes in host memory, under ZeRO-Offload (``compute.offload``) or when
  a CUDA run holds any on the CPU. On CUDA: the counted tensors whose device is the CPU. On a CPU run
  device and host are the same RAM, so it is the tensors ZeRO-Offload places on the host by their
  role: the optimizer's states and fp32 master partitions and their gradients (``optimizer``), and
  ZeRO-3's parameter partitions (``optimizer+params``); ``train_gb`` still counts them.

Values are the peak over the sampled steps so far (IST/RST's saved depth changes from step to step).
On CUDA ``cuda_peak_gb`` is the allocator's peak since ``reset_peak`` (``max_memory_allocated``:
tensors, the allocator's temporaries, kernels' workspaces) and ``cuda_reserved_gb`` the peak the
caching allocator held from the device (``max_memory_reserved``, the figure the TokenTune paper logs:
the above plus its rounding and cached free blocks). Neither counts the CUDA context or NCCL's
buffers: the estimate's ``device_gb`` term does (``tokentune.estimate.device_bytes``).
``process_rss_gb`` is the process's peak resident set (the Python/torch runtime included), the only
figure that covers everything on a CPU.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

GB = 1024**3
COMPONENTS = ("weights", "grads", "optimizer", "activations")


def process_rss_bytes() -> int:
    """The process's peak resident set size (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak(device: torch.device | str | None = None) -> None:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def distinct_bytes(tensors: Iterable[torch.Tensor | None], skip: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        ptr, nbytes = _storage_key(t)
        if nbytes and ptr not in seen and (skip is None or ptr not in skip):
            seen[ptr] = nbytes
    return sum(seen.values())


def held_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameter and buffer tensors this worker holds (ZeRO-3: its partition, and any gathered data)."""
    out: list[torch.Tensor] = []
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        if isinstance(part, torch.Tensor):
            out.append(part)
        out.append(p.data)
        out.extend(_quant_state_tensors(getattr(p, "quant_state", None)))
    out.extend(model.buffers())
    return out


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """A 4-bit weight's block scales (and their own scales, with double quantization) and code books."""
    out: list[torch.Tensor] = []
    while state is not None:
        out += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if t is not None]
        state = getattr(state, "state2", None)
    return out


class MemoryMeter:
    """Measures one worker's memory breakdown on the steps it is told to sample (see the module doc)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        offload: str = "none",
    ) -> None:
        self.model, self.optimizer, self.device, self.offload = model, optimizer, device, offload
        self.peak = dict.fromkeys(COMPONENTS, 0)
        self.host = dict.fromkeys(COMPONENTS, 0)  # of each component, the bytes on the host (see host_gb)
        self.sampled_steps = 0
        self._sampling = False
        self._activations = 0
        self._last_forward = 0
        self.peak_shape: tuple[int, int] | None = (
            None  # [batch, seq] of the micro-batch at the activation peak
        )
        self._param_ptrs: set[int] = set()
        optimizer.register_step_pre_hook(self._before_optimizer_step)
        optimizer.register_step_post_hook(self._after_optimizer_step)

    # ---- step protocol ---------------------------------------------------------------------------
    def start_step(self, sampled: bool) -> None:
        self._sampling = sampled
        self._activations = 0
        if sampled:
            weights = held_weights(self.model)
            self._param_ptrs = {_storage_key(w)[0] for w in weights}
            self._record("weights", distinct_bytes(weights))
            partitions = [getattr(p, "ds_tensor", None) for p in self.model.parameters()]
            self._record_host("weights", partitions, self.offload == "optimizer+params")

    def end_step(self) -> None:
        if self._sampling:
            self._record("activations", self._activations)
            self.sampled_steps += 1
        self._sampling = False

    @contextlib.contextmanager
    def saved_tensors(self) -> Iterator[None]:
        """Count what autograd saves for backward in this forward (a no-op on steps not sampled)."""
        if not self._sampling:
            yield
            return
        seen: dict[int, int] = {}
        held: list[torch.Tensor] = []  # the counted tensors, alive until the forward ends

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t._base if t._base is not None else t
            if not isinstance(base, torch.nn.Parameter) and t.device.type != "meta":
                ptr, nbytes = _storage_key(t)
                if ptr not in self._param_ptrs and ptr not in seen:
                    seen[ptr] = nbytes
                    held.append(t)
            return t

        # Holding each counted tensor until the forward ends keeps its address from being reused by a
        # later saved tensor (a saved temporary freed mid-forward would hide the next one at its
        # address): the count no longer depends on the allocator's history in this process.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        held.clear()
        self._last_forward = sum(seen.values())
        self._activations = max(self._activations, self._last_forward)

    def note_batch(self, input_ids: torch.Tensor) -> None:
        """After a micro-batch's forward: remember its [batch, seq] if its saved bytes are the peak so far."""
        if (
            self._sampling
            and self._last_forward
            and self._last_forward >= max(self.peak["activations"], self._activations)
        ):
            self.peak_shape = (int(input_ids.shape[0]), int(input_ids.shape[-1]))

    # ---- optimizer hooks -------------------------------------------------------------------------
    def _optimizer_params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _before_optimizer_step(self, *_: Any) -> None:
        if not self._sampling:
            return
        grads = [p.grad for p in self._optimizer_params()]
        grads += [p.grad for p in self.model.parameters()]
        self._record("grads", distinct_bytes(grads))
        self._record_host("grads", [p.grad for p in self._optimizer_params()], self.offload != "none")

    def _after_optimizer_step(self, *_: Any) -> None:
        if not self._sampling:
            return
        states = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        # the optimizer's own copies of the weights (ZeRO's fp32 partitions), not the model's tensors
        masters = [p for p in self._optimizer_params() if _storage_key(p)[0] not in self._param_ptrs]
        self._record("optimizer", distinct_bytes(states + masters))
        self._record_host("optimizer", states + masters, self.offload != "none")

    def _record(self, key: str, nbytes: int) -> None:
        self.peak[key] = max(self.peak[key], int(nbytes))

    def _record_host(self, key: str, tensors: list, offloaded: bool) -> None:
        """The bytes of ``tensors`` in host memory: on CUDA those on the CPU; on a CPU run (one memory)
        those ZeRO-Offload places on the host (``offloaded``: this component is offloaded)."""
        if self.device.type == "cuda":
            tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        elif not offloaded:
            return
        self.host[key] = max(self.host[key], distinct_bytes(tensors))

    # ---- results ---------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """``memory/*`` in GB: the breakdown (once a step was sampled), its sum, and the process/CUDA peaks."""
        out: dict[str, float] = {}
        if self.sampled_steps:
            out = {f"memory/{k}_gb": v / GB for k, v in self.peak.items()}
            out["memory/train_gb"] = sum(self.peak.values()) / GB
            if self.offload != "none" or any(self.host.values()):
                out["memory/host_gb"] = sum(self.host.values()) / GB
            if self.peak_shape is not None:  # the estimate at this shape is comparable (tokentune.estimate)
                out["memory/peak_batch"], out["memory/peak_seq_len"] = map(float, self.peak_shape)
        if self.device.type == "cuda":
            out["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            out["memory/cuda_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / GB
        out["memory/process_rss_gb"] = process_rss_bytes() / GB
        return out


class Throughput:
    """Tokens per second between calls of ``tick``."""

    def __init__(self) -> None:
        self.tokens = 0
        self._t = time.perf_counter()

    def add(self, n: int) -> None:
        self.tokens += int(n)

    def tick(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self._t, 1e-9)
        self.tokens, self._t = 0, now
        return rate
