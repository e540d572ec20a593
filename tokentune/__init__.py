"""tokentune: memory-efficient fine-tuning methods (TokenTune, IST/RST, LoRA/QLoRA/DoRA, full) in plain
PyTorch. Never imports ray or mlflow: ``orchestrator`` adapts it to Ray Train/Tune and MLflow.

Entry points: ``tokentune.train.train(cfg, report)``, ``tokentune.merge.merge_adapter``,
``tokentune.evaluate.evaluate``; configs via ``tokentune.config.load_config``. The names below are
imported lazily, so ``tokentune --help`` never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokentune.config import ConfigError, RunConfig, load_config

__all__ = ["ConfigError", "RunConfig", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        import tokentune.config

        value = getattr(tokentune.config, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokentune' has no attribute {name!r}")
