"""Registered training methods. Importing this package registers every built-in method."""

from tokentune.methods import checkpointing, full, ist, lora, qlora, tokentune  # noqa: F401  (registration side effects)
from tokentune.methods.base import (
    REGISTRY,
    Method,
    NoConfig,
    StepContext,
    known_methods,
    register,
    validate_methods,
)
from tokentune.methods.stack import MethodStack


def skip_unused_packages(
    method_lists: list[list[str]], keep: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """Keep this process from importing the optional packages (``Method.packages``) that none of the
    methods in ``method_lists`` needs: peft imports bitsandbytes (and, through it, torch's inductor)
    whenever it is installed, ~0.7 s per process here, though only QLoRA uses it. Only for a process
    that trains nothing else (a Ray Train worker); returns the skipped names. An already imported
    package is left alone, and so is each of ``keep`` (what else the run uses: an 8-bit optimizer's
    bitsandbytes, ``tokentune.optimizers.optimizer_packages``)."""
    import sys

    used = {p for names in method_lists for n in names if n in REGISTRY for p in REGISTRY[n].packages} | set(
        keep
    )
    skipped = []
    for name in sorted({p for m in REGISTRY.values() for p in m.packages} - used):
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
            skipped.append(name)
    return skipped


def allowed_combinations() -> list[list[str]]:
    """Every method list the registry allows, in a stable order (test-only methods, named ``_...``, left
    out): each trainer alone and with each quantizer, with every subset of the modifiers."""
    import itertools

    from tokentune.errors import ConfigError

    def kind(k: str) -> list[str]:
        return sorted(n for n, c in REGISTRY.items() if c.kind == k and not n.startswith("_"))

    combos = []
    for trainer, quant in itertools.product(kind("trainer"), [None, *kind("quantizer")]):
        mods = kind("modifier")
        for picked in itertools.chain.from_iterable(
            itertools.combinations(mods, k) for k in range(len(mods) + 1)
        ):
            names = [x for x in (quant, trainer, *picked) if x]
            try:
                validate_methods(names)
            except ConfigError:
                continue
            combos.append(names)
    return combos


__all__ = [
    "REGISTRY",
    "Method",
    "allowed_combinations",
    "MethodStack",
    "NoConfig",
    "StepContext",
    "known_methods",
    "register",
    "skip_unused_packages",
    "validate_methods",
]
