"""The official MS-Diffusion checkpoint: strict loading, and a safetensors conversion.

`ms_adapter.bin` (a torch pickle; read with weights_only=True) holds

    image_proj          the resampler's state dict
    ms_adapter          the state dict of a ModuleList of the UNet's attention processors in
                        unet.attn_processors order: "{k}.to_k_ip.weight", "{k}.to_v_ip.weight"
                        for every attn2 index k (the attn1 processors have no parameters)
    dummy_image_tokens  [1, 4, cross-attention dim]

The safetensors form (`relbench convert msdiffusion`) flattens it to "image_proj.<key>",
"ms_adapter.<key>" and "dummy_image_tokens". Loading checks every key and shape against the
model built from the UNet at hand, and names what is missing, extra or misshapen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import UserError
from .model import MSAdapter, some

PARTS = ("image_proj", "ms_adapter", "dummy_image_tokens")


def read_checkpoint(path: str | Path) -> dict[str, object]:
    """The nested official dict from a .bin (torch pickle) or a .safetensors conversion."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "ms_adapter.safetensors", path / "ms_adapter.bin"]
        path = next((c for c in candidates if c.is_file()), candidates[-1])
    if not path.is_file():
        raise UserError("no MS-Diffusion checkpoint here", path=path,
                        hint="pass ms_adapter.bin (hub doge1516/MS-Diffusion) with --weight msdiffusion=FILE")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _nest(load_file(str(path)), path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # pickle, zip and safetensors errors have no common base
        raise UserError(f"cannot read this file as an MS-Diffusion checkpoint ({type(exc).__name__}: {exc})",
                        path=path, hint="use the official ms_adapter.bin or its `relbench convert msdiffusion` output") from None
    if not isinstance(state, dict) or set(state) != set(PARTS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"not an MS-Diffusion checkpoint: top-level keys {found}, expected {list(PARTS)}", path=path)
    return state


def _nest(flat: dict[str, torch.Tensor], path: Path) -> dict[str, object]:
    out: dict[str, object] = {"image_proj": {}, "ms_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if key == "dummy_image_tokens":
            out["dummy_image_tokens"] = value
        elif part in ("image_proj", "ms_adapter") and rest:
            out[part][rest] = value  # type: ignore[index]
        else:
            raise UserError(f"unexpected key {key!r} in an MS-Diffusion safetensors file", path=path)
    if "dummy_image_tokens" not in out:
        raise UserError("the MS-Diffusion safetensors file has no dummy_image_tokens", path=path)
    return out


def flatten(state: dict[str, object]) -> dict[str, torch.Tensor]:
    flat = {f"image_proj.{k}": v for k, v in state["image_proj"].items()}  # type: ignore[union-attr]
    flat.update({f"ms_adapter.{k}": v for k, v in state["ms_adapter"].items()})  # type: ignore[union-attr]
    flat["dummy_image_tokens"] = state["dummy_image_tokens"]  # type: ignore[assignment]
    return {k: v.contiguous() for k, v in flat.items()}


def official_state(adapter: MSAdapter) -> dict[str, object]:
    """The adapter's weights in the official layout (what load_checkpoint reads back)."""
    return {
        "image_proj": {k: v.detach().clone() for k, v in adapter.resampler.state_dict().items()},
        "ms_adapter": {f"{k}.{name}": v.detach().clone() for k, proc in adapter.cross.items()
                       for name, v in proc.state_dict().items()},
        "dummy_image_tokens": adapter.dummy_image_tokens.detach().clone(),
    }


def load_checkpoint(adapter: MSAdapter, state: dict[str, object], path: str | Path | None = None) -> None:
    """Fill every parameter of `adapter` from `state`, or say exactly what does not fit."""
    expected = official_state(adapter)
    problems: list[str] = []
    for part in ("image_proj", "ms_adapter"):
        want, got = expected[part], state[part]  # type: ignore[index]
        missing = sorted(set(want) - set(got))  # type: ignore[arg-type]
        extra = sorted(set(got) - set(want))  # type: ignore[arg-type]
        shapes = [f"{k} {tuple(got[k].shape)} (model: {tuple(want[k].shape)})"  # type: ignore[index]
                  for k in sorted(set(want) & set(got)) if got[k].shape != want[k].shape]  # type: ignore[index]
        for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
            if keys:
                problems.append(f"{part}: {label} {some(keys, 6)}")
    dummy = state["dummy_image_tokens"]
    if tuple(dummy.shape) != tuple(expected["dummy_image_tokens"].shape):  # type: ignore[union-attr]
        problems.append(f"dummy_image_tokens: shape {tuple(dummy.shape)}, model "  # type: ignore[union-attr]
                        f"{tuple(expected['dummy_image_tokens'].shape)}")  # type: ignore[union-attr]
    if problems:
        raise UserError(
            "the MS-Diffusion checkpoint does not fit this model: " + "; ".join(problems),
            path=Path(path) if path else None,
            hint="use the official SDXL ms_adapter.bin with --backbone sdxl (other UNets need their own checkpoint)",
        )
    adapter.resampler.load_state_dict(state["image_proj"], strict=True)  # type: ignore[arg-type]
    per_proc: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state["ms_adapter"].items():  # type: ignore[union-attr]
        index, _, name = key.partition(".")
        per_proc.setdefault(index, {})[name] = value
    for index, proc in adapter.cross.items():
        proc.load_state_dict(per_proc[index], strict=True)
    with torch.no_grad():
        adapter.dummy_image_tokens.copy_(dummy)  # type: ignore[arg-type]


def convert(src: str | Path, dst: str | Path) -> int:
    """ms_adapter.bin -> safetensors (flat keys); returns the number of tensors written."""
    from safetensors.torch import save_file

    dst = Path(dst)
    flat = flatten(read_checkpoint(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(flat, str(tmp), metadata={"format": "pt", "source": "MS-Diffusion ms_adapter.bin"})
    tmp.replace(dst)
    return len(flat)
