"""Run configuration: plain dataclasses, validated in ``__post_init__``.

A run config is one YAML/dict with fixed sections (``model``, ``data``, ``train``, ``compute``,
``eval``), the ``methods`` list, and one optional section per registered method named after it
(``lora:``, ``tokentune:``, ``ist:`` ...). Every user-facing error names the offending key and
what would be accepted. Dotted overrides (``train.lr=1e-4``) use the same names as the YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokentune.compute import ComputeConfig
from tokentune.errors import ConfigError, check, check_expanded_size, is_int, is_number
from tokentune.methods import REGISTRY, validate_methods
from tokentune.optimizers import OPTIMIZERS, check_optimizer
from tokentune.settings import build_section, setting

__all__ = ["ConfigError", "RunConfig", "build_section", "load_config"]


DTYPES = ("float32", "bfloat16", "float16", "float64")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ModelConfig:
    """Which base model to load (section ``model``)."""

    name_or_path: str | None = setting(None, "hub name or local dir; null = the shipped tiny Llama")
    tokenizer: str | None = setting(None, "tokenizer hub name or dir; null = the model's")
    dtype: str = setting(
        "auto", "weights dtype: auto (bfloat16 where CUDA supports it, else float32), float32, bfloat16, ..."
    )
    attn_implementation: str = setting(
        "sdpa", "sdpa or eager (TokenTune and its stock baseline call the same sdpa kernels on each device)"
    )
    trust_remote_code: bool = setting(False, "let transformers run the model repository's own code")

    def __post_init__(self) -> None:
        check(self.dtype in ("auto", *DTYPES), "model.dtype", self.dtype, f"one of auto, {', '.join(DTYPES)}")
        check(
            self.attn_implementation in ("sdpa", "eager"),
            "model.attn_implementation",
            self.attn_implementation,
            "'sdpa' or 'eager'",
        )


DATA_FORMATS = ("alpaca", "chat", "text")
#: data.format -> the row fields it reads (data.columns maps them to the dataset's own column names)
DATA_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",), "text": ("text",)}


@dataclass
class DataConfig:
    """Training data (section ``data``): JSON/JSONL rows or an HF dataset, in one of three formats."""

    train: str | None = setting(
        None, ".json/.jsonl rows or an HF dataset name; null = the shipped instruction (or chat) data"
    )
    val: str | None = setting(
        None, "validation rows, as data.train; null = shipped (or split off data.train)"
    )
    format: str = setting(
        "alpaca",
        "alpaca (instruction/input/output), chat (messages, or ShareGPT conversations; loss on the "
        "assistant turns) or text (loss on every token)",
    )
    columns: dict[str, str] = setting(
        None,
        "our field -> the dataset's column, e.g. {instruction: question, output: answer} or "
        "{messages: dialog}; null = the names as they are",
    )
    chat_template: str | None = setting(
        None, "a Jinja chat template file for data.format=chat; null = the tokenizer's own"
    )
    split: str = setting(
        "train", "split of an HF dataset in data.train (a hub data.val: its validation split)"
    )
    subset: str | None = setting(None, "configuration name of an HF dataset (its subset); null = default")
    revision: str | None = setting(None, "git revision (branch, tag, commit) of an HF dataset; null = main")
    val_fraction: float = setting(0.05, "validation share split off data.train when data.val is unset")
    template: str = setting("alpaca", "alpaca, or a JSON file with prompt_input and prompt_no_input keys")
    max_length: int = setting(128, "truncation length in tokens (>= 8)")
    train_on_inputs: bool = setting(
        False, "also train on prompt tokens (else they are masked with -100); chat: on every turn"
    )
    max_examples: int | None = setting(None, "cap on training rows (quick runs); null = all")

    def __post_init__(self) -> None:
        check(self.format in DATA_FORMATS, "data.format", self.format, f"one of {', '.join(DATA_FORMATS)}")
        self.columns = dict(self.columns or {})
        fields_ = DATA_FIELDS[self.format]
        for ours, theirs in self.columns.items():
            check(ours in fields_, f"data.columns.{ours}", theirs, f"a key among {', '.join(fields_)} "
                  f"(the fields of data.format={self.format})")  # fmt: skip
            check(isinstance(theirs, str) and bool(theirs), f"data.columns.{ours}", theirs, "a column name")
        for key in ("chat_template", "subset", "revision"):
            v = getattr(self, key)
            check(v is None or (isinstance(v, str) and bool(v)), f"data.{key}", v, "a string or null")
        check(isinstance(self.split, str) and bool(self.split), "data.split", self.split, "a split name")
        check(
            is_int(self.max_length) and self.max_length >= 8,
            "data.max_length",
            self.max_length,
            "an integer >= 8",
        )
        check(
            is_number(self.val_fraction) and 0 < self.val_fraction < 1,
            "data.val_fraction",
            self.val_fraction,
            "a number in (0, 1)",
        )
        if self.max_examples is not None:
            check(
                is_int(self.max_examples) and self.max_examples >= 1,
                "data.max_examples",
                self.max_examples,
                "an integer >= 1",
            )


DEFAULT_MAX_STEPS = 200


@dataclass
class TrainConfig:
    """The optimisation loop (section ``train``)."""

    lr: float = setting(1e-3, "AdamW learning rate, in (0, 1)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    schedule: str = setting("cosine", "learning-rate schedule after warmup: cosine, linear or constant")
    warmup_steps: int = setting(10, "linear warmup steps")
    max_steps: int | None = setting(
        None, "optimizer steps; null = from train.epochs when that is set, else 200 (set one of the two)"
    )
    epochs: float | None = setting(
        None,
        "passes over the training rows instead of max_steps: steps = ceil(epochs x (rows // (batch_size x "
        "workers)) / grad_accum), rows counted after truncation drops; null = use max_steps",
    )
    batch_size: int = setting(16, "micro-batch per worker")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    max_grad_norm: float | None = setting(1.0, "gradient clipping norm; null = off")
    optimizer: str = setting(
        "adamw",
        "adamw (fp32 states), adamw_8bit (bitsandbytes: uint8 states, CPU or GPU) or paged_adamw_8bit "
        "(bitsandbytes, GPU only); 8-bit: not with compute.zero_stage",
    )
    bf16: str = setting("auto", "bf16 autocast of the forward: auto (CUDA with bf16 support), true or false")
    seed: int = setting(
        0, "seeds torch (model init, dropout) and the data order; methods have their own seeds"
    )
    log_every: int = setting(10, "report metrics every N optimizer steps")
    eval_every: int = setting(0, "validation loss every N steps (0: only at the end)")
    eval_batches: int = setting(8, "validation micro-batches per evaluation (0: the whole split)")
    save_every: int = setting(0, "checkpoint every N steps (0: only the final artifact)")
    keep_checkpoints: int = setting(2, "checkpoints kept (the newest)")
    output_dir: str = setting(
        "runs/train", "where checkpoint-NNNNNN/, final/ (adapter or model) and result.json go"
    )

    def __post_init__(self) -> None:
        check(is_number(self.lr) and 0 < self.lr < 1, "train.lr", self.lr, "a number in (0, 1), e.g. 1e-4")
        check(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            "train.weight_decay",
            self.weight_decay,
            "a number >= 0",
        )
        check(self.schedule in SCHEDULES, "train.schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        check(
            self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}"
        )
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError(
                f"train.epochs={self.epochs!r} and train.max_steps={self.max_steps!r} are both set: set exactly "
                "one of them (the other null), e.g. train: {epochs: 2, max_steps: null}"
            )
        if self.epochs is not None:
            check(
                is_number(self.epochs) and self.epochs > 0,
                "train.epochs",
                self.epochs,
                "a number > 0 or null",
            )
        elif self.max_steps is None:
            self.max_steps = DEFAULT_MAX_STEPS
        for key in ("batch_size", "grad_accum", "keep_checkpoints") + (
            ("max_steps",) if self.epochs is None else ()
        ):
            v = getattr(self, key)
            check(is_int(v) and v >= 1, f"train.{key}", v, "an integer >= 1")
        for key in ("warmup_steps", "log_every", "eval_every", "save_every", "eval_batches"):
            v = getattr(self, key)
            check(is_int(v) and v >= 0, f"train.{key}", v, "an integer >= 0")
        if self.max_grad_norm is not None:
            check(
                is_number(self.max_grad_norm) and self.max_grad_norm > 0,
                "train.max_grad_norm",
                self.max_grad_norm,
                "a number > 0 or null",
            )
        self.bf16 = str(self.bf16).lower()
        check(self.bf16 in ("auto", "true", "false"), "train.bf16", self.bf16, "auto, true or false")
        self.betas = tuple(self.betas)  # YAML gives a list

    def total_steps(self, n_rows: int, world_size: int = 1) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``epochs`` over ``n_rows`` training rows (a
        micro-step takes ``batch_size x world_size`` rows; an epoch is ``n_rows // that`` micro-steps)."""
        if self.epochs is None:
            return int(self.max_steps)
        per_epoch = max(1, n_rows // (self.batch_size * world_size))
        return max(1, math.ceil(self.epochs * per_epoch / self.grad_accum))


@dataclass
class EvalConfig:
    """lm-eval after training (section ``eval``)."""

    tasks: list[str] | None = setting(
        None, "lm-eval tasks (name[:fewshot], or a task YAML path); null = the shipped"
    )
    num_fewshot: int | None = setting(
        None, "shots for tasks named without a :fewshot suffix; null = the task's default"
    )
    limit: int | None = setting(None, "documents per task (quick checks); null = all")
    batch_size: int = setting(16, "lm-eval batch size")

    def __post_init__(self) -> None:
        if self.tasks is not None:
            check(
                isinstance(self.tasks, list) and all(isinstance(t, str) and t for t in self.tasks),
                "eval.tasks",
                self.tasks,
                "a list of task names",
            )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "compute": ComputeConfig,
    "eval": EvalConfig,
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: list[str] = field(default_factory=lambda: ["lora"])
    method_configs: dict[str, Any] = field(default_factory=dict)  # name -> that method's dataclass

    def __post_init__(self) -> None:
        self.method_configs = validate_methods(self.methods, self.method_configs)
        # across sections: DeepSpeed with an 8-bit optimizer, bitsandbytes missing, paged on a CPU run
        check_optimizer(self, gpu=False if self.compute.use_gpu is False else None)

    def __getattr__(self, name: str) -> Any:
        """``cfg.lora``, ``cfg.tokentune``, ...: a registered method's settings section.

        A method that is registered but has no section yet gets its defaults (kept, so that
        ``cfg.ist.budget = 2`` sticks), as in YAML, where an omitted section means the defaults.
        """
        if name.startswith("__") or name == "method_configs":
            raise AttributeError(name)
        configs = self.__dict__.get("method_configs")
        if configs is None:
            raise AttributeError(name)
        if name not in configs:
            if name not in REGISTRY:
                raise AttributeError(
                    f"RunConfig has no section {name!r}; sections: {', '.join(SECTIONS)}, methods, and one "
                    f"per registered method ({', '.join(sorted(REGISTRY))})"
                )
            configs[name] = REGISTRY[name].config_cls()
        return configs[name]

    def copy(self) -> RunConfig:
        """An independent copy (e.g. to give a trial its own ``train.output_dir``)."""
        return copy.deepcopy(self)

    # ---- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RunConfig:
        d = dict(d or {})
        known = set(SECTIONS) | {"methods"} | set(REGISTRY)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key {unknown[0]!r}; accepted top-level keys: {', '.join(sorted(known))}"
            )
        kwargs: dict[str, Any] = {
            name: build_section(name, sec, d.get(name)) for name, sec in SECTIONS.items()
        }
        methods = d.get("methods", ["lora"])
        methods = [methods] if isinstance(methods, str) else methods  # validated in __post_init__
        method_cfgs = {}
        for name in REGISTRY:
            if name in d:
                method_cfgs[name] = build_section(name, REGISTRY[name].config_cls, d[name])
        return cls(
            methods=list(methods) if isinstance(methods, list) else methods,
            method_configs=method_cfgs,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["methods"] = list(self.methods)
        for name, mc in self.method_configs.items():
            out[name] = dataclasses.asdict(mc)
        out["train"]["betas"] = list(out["train"]["betas"])
        return out


# ---- overrides ---------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[str, Any]:
    """``'train.lr=1e-4'`` -> ``('train.lr', 0.0001)``; values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is invalid: expected key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(d: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    d = copy.deepcopy(d)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for k, v in items:
        set_dotted(d, k, v)
    return d


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {str(p)!r} is not UTF-8 text: byte {e.start} is {raw[e.start : e.start + 1]!r} "
            "(save it as UTF-8)"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    check_expanded_size(data, f"config file {str(p)!r}")  # before anything formats it
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    d = load_yaml(path) if path else {}
    return RunConfig.from_dict(apply_overrides(d, overrides))
