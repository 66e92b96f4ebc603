"""The LoRA bank: its index round-trips; a run loads each LoRA once and switches adapters
(set_adapters, or hotswap into one slot), the UNet computing W + up @ down of the active LoRA,
the base model when none is active; close() takes every adapter off; `relbench lora list`."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.methods.lora.bank import BankAdapters, LoraBank
from relationbench.methods.lora.files import SETTINGS_NAME, WEIGHT_NAME

from .lora_reference import merged

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = get_backbone("tiny").describe()


@pytest.fixture(scope="module")
def pipe():
    return get_backbone("tiny").sdxl_pipeline()


def fake_lora(folder, unet, seed: int, rank: int = 2, steps: int = 7) -> dict[str, torch.Tensor]:
    """A random LoRA on every to_q and attn2.to_v, in the trainer's file layout."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "attn2.to_v")):
            state[f"unet.{name}.lora.down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.1
            state[f"unet.{name}.lora.up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.1
    folder.mkdir(parents=True)
    safetensors.torch.save_file(state, str(folder / WEIGHT_NAME))
    (folder / SETTINGS_NAME).write_text(json.dumps({"settings": {"rank": rank, "train_steps": steps}}))
    return state


def run(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), 500,
                    encoder_hidden_states=torch.randn(1, 77, 96, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.randn(1, 6, generator=g)}).sample


def test_index_round_trip(tmp_path, pipe):
    bank = LoraBank(tmp_path / "bank")
    fake_lora(bank.folder("a"), pipe.unet, 0)
    first = bank.add("a", base=TINY, info={"subjects": ["dog"]})
    fake_lora(tmp_path / "trained", pipe.unet, 1, rank=3)
    bank.add("b", base=TINY, source=tmp_path / "trained")  # copied in
    again = LoraBank(tmp_path / "bank")
    assert [e.name for e in again.entries()] == ["a", "b"]
    assert again.get("a") == first and first.info == {"subjects": ["dog"]} and first.base == TINY
    assert (first.file, first.rank, first.steps, first.base_model) == (f"a/{WEIGHT_NAME}", 2, 7, "tiny")
    assert again.get("b").rank == 3 and again.weights("b") == tmp_path / "bank" / "b" / WEIGHT_NAME
    assert "a" in again and "c" not in again
    with pytest.raises(KeyError, match="holds: a, b"):
        again.get("c")
    with pytest.raises(ValueError):
        again.folder("../x")
    with pytest.raises(FileExistsError):
        bank.add("b", base=TINY, source=tmp_path / "trained")
    (tmp_path / "bank" / "index.json").write_text("{")
    with pytest.raises(UserError, match="damaged"):
        again.entries()


def test_cli_lists_a_bank(tmp_path, pipe):
    bank = LoraBank(tmp_path)
    fake_lora(bank.folder("dog-lora"), pipe.unet, 0, rank=4, steps=500)
    bank.add("dog-lora", base=get_backbone("sdxl").describe())
    res = CliRunner().invoke(cli, ["lora", "list", str(tmp_path)])
    assert res.exit_code == 0, res.output
    header, _, row = res.output.splitlines()[:3]
    assert header.split()[:4] == ["name", "file", "rank", "steps"] and "base model" in header
    assert row.split()[:5] == ["dog-lora", f"dog-lora/{WEIGHT_NAME}", "4", "500", "sdxl"]
    assert "stabilityai/stable-diffusion-xl-base-1.0" in row
    res = CliRunner().invoke(cli, ["lora", "list", str(tmp_path / "dog-lora")])
    assert res.exit_code == 2 and "not a LoRA bank" in res.output


@pytest.mark.parametrize("hotswap", [False, True])
def test_load_once_switch_many_close(tmp_path, pipe, monkeypatch, hotswap):
    bank = LoraBank(tmp_path)
    states = {}
    for i, name in enumerate(["a", "b"]):
        states[name] = fake_lora(bank.folder(name), pipe.unet, i, rank=2 + 2 * i)  # ranks differ (hotswap pads)
        bank.add(name, base=TINY)
    base = run(pipe.unet)
    expected = {name: run(merged(pipe.unet, s)) for name, s in states.items()}
    assert not torch.allclose(expected["a"], base, atol=1e-3)
    assert not torch.allclose(expected["a"], expected["b"], atol=1e-3)

    reads, loads = [], []
    real_read, real_load = safetensors.torch.load_file, pipe.load_lora_weights
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    monkeypatch.setattr(pipe, "load_lora_weights", lambda *a, **k: loads.append(k.get("hotswap")) or real_load(*a, **k))
    adapters = BankAdapters(pipe, bank, hotswap=hotswap)
    adapters.prepare(["a", "b"])
    for name in ["a", "b", "a", None, "b", None, "a", "b"]:
        adapters.activate(name)
        torch.testing.assert_close(run(pipe.unet), base if name is None else expected[name], atol=2e-5, rtol=1e-4)
    assert len(reads) == 2  # each file read once
    if hotswap:
        assert loads == [False] + [True] * 5  # every switch into one slot, from memory
        assert pipe.get_list_adapters() == {"unet": ["bank"]}
    else:
        assert len(loads) == 2 and pipe.get_list_adapters() == {"unet": ["a", "b"]}
    adapters.close()
    assert not pipe.get_list_adapters() and not hasattr(pipe.unet, "peft_config")
    assert not any("lora" in k or "base_layer" in k for k in pipe.unet.state_dict())
    torch.testing.assert_close(run(pipe.unet), base)
