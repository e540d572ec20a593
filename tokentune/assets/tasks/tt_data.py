"""lm-eval loader of the shipped tasks' documents (the YAMLs' ``custom_dataset: !function tt_data.load_docs``).

lm-eval imports this file from the YAMLs' folder and calls ``load_docs(**metadata, **dataset_kwargs)``;
``data_files`` paths are taken relative to this folder, so ``lm_eval --include_path <this folder>`` works
from any working directory (a ``dataset_path: json`` task resolves them from the CWD).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_docs(data_files: dict[str, str], **_metadata: Any) -> Any:
    """``{split: "data/<task>.jsonl"}`` -> a ``datasets.DatasetDict`` of the JSONL documents."""
    import datasets

    files = {split: str(HERE / path) for split, path in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
