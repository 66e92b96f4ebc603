"""Device and dtype choice, shared by every command that runs a model."""

from __future__ import annotations

from .errors import UserError

DTYPES = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible", hint="use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    """fp32 on CPU, bf16 on GPU unless asked otherwise."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if dtype == "auto":
        dtype = "fp32" if device == "cpu" else "bf16"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def dtype_name(dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
