"""Shared fixtures and helpers of the test suite (offline hub, seeds), in one place:

- tiny random models built from configs (``make_tiny_causal_lm``: Llama, Mistral, Qwen2, Qwen3, Gemma),
  a tiny workspace (checkpoint + tokenizer + data) and run-config dicts on it;
- rows that fill any ``data.max_length`` and the memory estimate's check against a measurement;
- every allowed method combination (the contract set);
- a local Ray for tests marked ``ray``, and the ``ray`` marker enforced (see ``pytest_runtest_setup``);
- an MLflow SQLite store whose tables exist already (creating them takes ~10 s).

Test modules import helpers from here, never from each other (``tests/test_layout.py`` checks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

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
    """A random decoder of the given family (llama, mistral, qwen2, qwen3, gemma), built from its config.

    Gemma has Llama's layer shape but scaled embeddings, (1 + w) RMSNorm and (its default) a head tied
    to the embeddings; its head_dim is set to hidden / heads (its config's default is 256)."""
    import transformers

    cfg_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    }[family]
    extra = {"head_dim": hidden // heads} if family == "gemma" else {"tie_word_embeddings": False}
    cfg = getattr(transformers, cfg_cls)(
        **extra,
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


# ---- method combinations, long rows and the memory estimate's check ---------------------------------------
def allowed_combinations() -> list[list[str]]:
    """Every method list the registry allows (the contract set): ``tokentune.methods.allowed_combinations``."""
    from tokentune.methods import allowed_combinations as registry_combinations

    return registry_combinations()


LONG_WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma tau omega one two three".split()
)


def write_long_rows(folder) -> str:
    """Instruction rows far longer than any max_length used here: every sequence is truncated, so every
    micro-batch is [batch_size, max_length] as the estimate assumes (with train_on_inputs, every token
    is supervised)."""
    import json
    import random

    rng = random.Random(0)
    rows = [
        {"instruction": "Continue the list.", "input": " ".join(rng.choices(LONG_WORDS, k=20)),
         "output": " ".join(rng.choices(LONG_WORDS, k=400))}
        for _ in range(48)
    ]  # fmt: skip
    path = Path(folder) / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def long_rows(tmp_path_factory) -> str:
    return write_long_rows(tmp_path_factory.mktemp("long"))


SPARSE_METHODS = ("ist", "rst")


def memory_run_dict(methods, data, out_dir, *, max_length, model=None, steps=8, **compute) -> dict:
    """A run on rows that fill ``max_length`` (``write_long_rows``), logging (and measuring) every step."""
    d = {
        "methods": list(methods),
        "data": {"train": data, "val": data, "max_length": max_length, "train_on_inputs": True},
        "train": {
            "max_steps": steps,
            "batch_size": 2,
            "log_every": 1,
            "eval_batches": 1,
            "warmup_steps": 0,
            "output_dir": str(out_dir),
        },
    }
    if model:
        d["model"] = {"name_or_path": model}
    if compute:
        d["compute"] = compute
    for m in SPARSE_METHODS:
        if m in methods:
            d[m] = {"budget": 1, "seed": 1}
    return d


def reached_sparse_peak(history: list[dict], layers: int) -> bool:
    """IST/RST: every layer trained at least once and layer 0 trained at some (sampled) step."""
    seen: set[int] = set()
    for h in history:
        seen |= {int(k.rsplit("/", 1)[1]) for k, v in h.items() if "/active/" in k and v == 1.0}
    return seen == set(range(layers))


ESTIMATE_TOTAL_TOL = 0.15
ESTIMATE_PART_TOL = 0.25
ESTIMATE_PART_ABS_GB = 2 / 1024  # 2 MB


def check_estimate(cfg, memory: dict[str, float]) -> list[str]:
    """The estimate (at the measured micro-batch shape) against the measurement; a list of misses:
    the total within +-15%, each component within +-25% or 2 MB."""
    from tokentune.estimate import estimate_measured

    mb = 1 / 1024
    est = estimate_measured(cfg, memory)
    misses = []
    measured = memory["memory/train_gb"]
    if abs(est.breakdown_gb / measured - 1) > ESTIMATE_TOTAL_TOL:  # train_gb: no DeepSpeed buffers
        misses.append(f"total: estimate {est.breakdown_gb / mb:.3f} MB vs measured {measured / mb:.3f} MB")
    for part in ("weights", "grads", "optimizer", "activations"):
        e, m = getattr(est, f"{part}_gb"), memory[f"memory/{part}_gb"]
        if abs(e - m) > max(ESTIMATE_PART_TOL * m, ESTIMATE_PART_ABS_GB):
            misses.append(f"{part}: estimate {e / mb:.3f} MB vs measured {m / mb:.3f} MB")
    return misses


# ---- services: a local Ray, an MLflow store ---------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs shared by a module's tests marked ``ray`` (a start costs 5-30 s on 2 cores);
    its workers import this checkout, offline. Each test leaves its CPUs free again."""
    import ray

    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if ray.is_initialized():  # a Ray another module's in-process sweep left up: this one must hold 2 CPUs
        ray.shutdown()
    try:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    except Exception as e:  # Ray waits a fixed 30 s for its raylet: a loaded machine can miss that once
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_tables(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database with its tables, made once (creating them takes ~10 s)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_tables") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="module")
def mlflow_store(mlflow_tables, tmp_path_factory) -> tuple[str, Path]:
    """(tracking URI, its folder): a fresh SQLite store for the module, copied from the prepared tables."""
    import shutil

    root = tmp_path_factory.mktemp("mlflow")
    shutil.copyfile(mlflow_tables, root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}", root


@contextlib.contextmanager
def running_mlflow_server(root: Path, tables: Path):
    """An ``mlflow server`` (one worker, its store copied from ``tables``, artifacts under ``root``) on a
    free port of 127.0.0.1; yields its URL; stopped (its process group) on exit."""
    import shutil
    import signal
    import subprocess
    import time
    import urllib.request

    shutil.copyfile(tables, root / "mlflow.db")
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "art"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # ~25 s on an idle machine
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers (a session of its own)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ---- the `ray` marker, enforced ------------------------------------------------------------------------
RAY_MARK_HINT = "mark it @pytest.mark.ray (and @pytest.mark.slow if it takes over ~30 s on 2 cores)"
_ray_guards: dict[str, tuple[str, str | None, object]] = {}


class RayNotMarked(RuntimeError):
    """A test not marked ``ray`` tried to start Ray."""


def _refuse_ray_init(nodeid: str):
    def init(*args, **kwargs):
        raise RayNotMarked(f"{nodeid} calls ray.init but is not marked `ray`: {RAY_MARK_HINT}")

    return init


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """For a test not marked ``ray`` (from before its fixtures start, module-scoped ones included, until
    its teardown ends): ``ray.init`` in this process raises ``RayNotMarked``, and ``RAY_TMPDIR`` points at
    an empty folder of its own, so a Ray node started by any process it runs (``ray start``, ``tokentune
    sweep``) leaves a session folder there that ``pytest_runtest_teardown`` reports."""
    if item.get_closest_marker("ray") is None and item.nodeid not in _ray_guards:
        import tempfile

        folder = tempfile.mkdtemp(prefix="tt-ray-")  # short: Ray's socket paths must stay under 108 bytes
        ray = sys.modules.get("ray")  # not imported here (seconds): a later import is caught by the folder
        _ray_guards[item.nodeid] = (folder, os.environ.get("RAY_TMPDIR"), ray and ray.init)
        os.environ["RAY_TMPDIR"] = folder
        if ray is not None:
            ray.init = _refuse_ray_init(item.nodeid)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        result = yield
    finally:
        guard = _ray_guards.pop(item.nodeid, None)
        if guard is not None:
            import shutil

            folder, before, init = guard
            if init is not None:
                sys.modules["ray"].init = init
            if before is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = before
            sessions = sorted(p.name for p in Path(folder, "ray").glob("session_*"))
            shutil.rmtree(folder, ignore_errors=True)
            if sessions:
                raise RayNotMarked(
                    f"{item.nodeid} started a Ray node ({sessions[0]} appeared in its RAY_TMPDIR) but is "
                    f"not marked `ray`: {RAY_MARK_HINT}"
                )
    return result


#: measured worker seconds per test file in a full run on 2 cores (``--junitxml``, summed per file; the
#: files not listed took under a minute; 6650 s in all, 3379 s of wall time on two workers). Under
#: ``-n 2 --dist loadfile`` the longest files start first so the two workers end together (xdist's own
#: order, most tests first, left the few-test multi-minute files for last, one worker running them alone).
FILE_SECONDS = {
    "test_faults.py": 1059,
    "test_sweep.py": 857,
    "test_cluster.py": 810,
    "test_readme.py": 655,
    "test_distributed.py": 620,
    "test_memory.py": 453,
    "test_memory_bf16.py": 397,
    "test_evaluate.py": 331,
    "test_chat_train.py": 259,
    "test_multiobjective.py": 234,
    "test_bench.py": 157,
    "test_ist.py": 90,
    "test_secrets.py": 89,
    "test_tracking_queue.py": 88,
    "test_methods_contract.py": 71,
    "test_mlflow_ui.py": 65,
    "test_post_trial.py": 62,
    "test_ray_cluster.py": 56,
}


def pytest_configure(config):
    if getattr(config.option, "dist", "no") == "loadfile":
        config.option.loadscopereorder = False  # keep the order below: the longest files first


def pytest_collection_modifyitems(config, items):
    """The longest files first (:data:`FILE_SECONDS`), each file's tests in their order. Tests marked
    ``gpu`` run where CUDA is visible and are skipped (with the reason) elsewhere."""
    items.sort(
        key=lambda it: -FILE_SECONDS.get(Path(str(it.fspath)).name, 0)
    )  # stable: a file keeps its order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: gradient checkpointing doubles the allowed combinations: every one runs on the tiny model in fp32; on
#: the wider model and under bf16, these (each trainer, QLoRA, with TokenTune and with IST) stand for them
CHECKPOINTING_SAMPLE = [
    ["full", "checkpointing"],
    ["lora", "checkpointing"],
    ["dora", "checkpointing"],
    ["qlora", "lora", "checkpointing"],
    ["lora", "tokentune", "checkpointing"],
    ["lora", "ist", "checkpointing"],
]


#: set to 1 to run every checkpointing combination wherever a test samples them (CI runs the sample)
ALL_COMBINATIONS_ENV = "TOKENTUNE_TEST_ALL_COMBINATIONS"


def sampled_combinations(everything: bool) -> list[list[str]]:
    """The allowed combinations; unless ``everything`` (or :data:`ALL_COMBINATIONS_ENV` is 1), those with
    checkpointing only as sampled."""
    everything = everything or os.environ.get(ALL_COMBINATIONS_ENV) == "1"
    return [
        m
        for m in allowed_combinations()
        if everything or "checkpointing" not in m or sorted(m) in map(sorted, CHECKPOINTING_SAMPLE)
    ]


# ---- a spec the loader refuses -----------------------------------------------------------------------------
def refused(d: dict, key: str, *fragments: str, overrides=None) -> str:
    """``load_spec(d, overrides)`` raises a SpecError naming ``key`` whose text holds every fragment."""
    from orchestrator.spec.sweep import SpecError, load_spec

    with pytest.raises(SpecError) as info:
        load_spec(d, overrides)
    err = str(info.value)
    assert info.value.key == key, err
    for frag in fragments:
        assert frag in err, f"{frag!r} not in: {err}"
    return err


# ---- killing and reading a sweep run as a subprocess (tests/test_sweep.py, tests/test_multiobjective.py)
def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session`` and every descendant (a killed sweep driver)."""
    pids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:  # Ray's own daemons may have left the process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def mlflow_sweep_runs(tracking_uri: str, sweep: str):
    """(parent runs, child runs) of the MLflow experiment ``sweep``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tokentune.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("tokentune.role") == "trial"]
    return parents, children
