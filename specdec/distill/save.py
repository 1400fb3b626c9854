"""Write a trained draft as an ordinary Hugging Face model directory (+ ``distill.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specdec.distill.model import standalone

RECORD_NAME = "distill.json"


def save_draft(draft, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
               record: dict | None = None) -> Path:
    """``save_pretrained`` a self-contained copy of ``draft`` (shared tensors included) to ``out_dir``.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` and works as
    ``specdec.generate(draft_model=...)``. ``record`` (the training log) goes to ``distill.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    standalone(draft, dtype).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if record is not None:
        write_json(record, out / RECORD_NAME)
    return out


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_plain) + "\n", encoding="utf-8")
    return path


def _plain(x):
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
