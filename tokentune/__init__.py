"""tokentune: memory-efficient fine-tuning methods (TokenTune, IST/RST, LoRA/QLoRA/DoRA, full) in plain
PyTorch. Never imports ray or mlflow: ``orchestrator`` adapts it to Ray Train/Tune and MLflow.

Entry points: ``tokentune.train.train(cfg, report)``, ``tokentune.merge.merge_adapter``,
``tokentune.evaluate.evaluate``; configs via ``tokentune.config.load_config``.
"""

from tokentune.config import ConfigError, RunConfig, load_config

__all__ = ["ConfigError", "RunConfig", "load_config"]
__version__ = "0.1.0"
