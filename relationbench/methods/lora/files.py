"""The files of a trained LoRA folder (the trainer writes them, the bank indexes them); no torch
import, so listing a bank stays light."""

from __future__ import annotations

import json
from pathlib import Path

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
SETTINGS_NAME = "lora_settings.json"  # trainer settings, targets, the caller's info
LOSS_LOG_NAME = "loss.jsonl"  # one line per optimizer step: step, loss, lr, seconds


def write_loss_log(path: Path, log: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in log))


def read_loss_log(folder: Path) -> list[dict]:
    """The per-step records of a trained LoRA (or checkpoint) folder."""
    path = Path(folder) / LOSS_LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
