"""Released RelationLoRAs (the authors' layout: one folder per relation, diffusers' file with
keys unet.<attn2 projection>.lora_A/B or .lora.down/up) import into a bank with their source,
sha256 and rank, and load with StableDiffusionXLPipeline.load_lora_weights so the UNet computes
W + (alpha / r) B A; a LoRA our trainer made does too. Bad files stop with the file and key
named; `relbench lora import` exits 0, or 2 on a user error."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.methods.lora.bank import BankAdapters, LoraBank
from relationbench.methods.lora.files import WEIGHT_NAME
from relationbench.methods.lora.trainer import TrainerSettings, train_lora
from relationbench.methods.relationbooth.lora import (
    check_lora_file,
    default_bank,
    import_loras,
    relation_name,
    relationlora_targets,
)

from .lora_reference import merged
from .test_lora_bank import run

pytestmark = pytest.mark.usefixtures("one_thread")

AUTHORS_FOLDER = "lora-trained-xl-hugging-0.1kp-0.001cal-0.6"  # as in the authors' example config


@pytest.fixture(scope="module")
def pipe():
    return get_backbone("tiny").sdxl_pipeline()


def authors_lora(folder, unet, seed: int, rank: int = 2, naming: str = "peft", alpha: float | None = None,
                 extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A random RelationLoRA in the authors' layout: folder/pytorch_lora_weights.safetensors."""
    parts = ("lora_A", "lora_B") if naming == "peft" else ("lora.down", "lora.up")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in relationlora_targets(unet):
        m = unet.get_submodule(name)
        state[f"unet.{name}.{parts[0]}.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
        state[f"unet.{name}.{parts[1]}.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
    state.update(extra or {})
    metadata = {"format": "pt"}
    if alpha is not None:  # diffusers' adapter metadata, as its newer save_lora_weights writes it
        metadata["lora_adapter_metadata"] = json.dumps({"unet.r": rank, "unet.lora_alpha": alpha,
                                                        "unet.target_modules": relationlora_targets(unet)})
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(folder / WEIGHT_NAME), metadata=metadata)
    return state


def by_hand(unet, state: dict[str, torch.Tensor], scale: float = 1.0):
    """A copy of the UNet with W + scale * B A written into it (lora_reference's merge)."""
    named = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in state.items()}
    return merged(unet, {k: v * scale if ".up." in k else v for k, v in named.items()})


def loaded(pipe, file, name: str) -> torch.Tensor:
    """The UNet's output with the LoRA file loaded by diffusers, then unloaded again."""
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    try:
        return run(pipe.unet)
    finally:
        pipe.unload_lora_weights()


def test_folder_scan_imports_the_authors_layout_and_loads_in_diffusers(tmp_path, pipe):
    src = tmp_path / "DreamRelation"
    hug = authors_lora(src / AUTHORS_FOLDER, pipe.unet, 0)
    shake = authors_lora(src / "shaking_hands", pipe.unet, 1, rank=3, naming="diffusers")
    bank = LoraBank(tmp_path / "bank")
    done = import_loras(src, bank)
    assert [(e.name, added) for e, added in done] == [("hugging", True), ("shaking_hands", True)]
    entry = bank.get("hugging")
    sha = hashlib.sha256((src / AUTHORS_FOLDER / WEIGHT_NAME).read_bytes()).hexdigest()
    assert entry.info == {"relation": "hugging", "source": str((src / AUTHORS_FOLDER / WEIGHT_NAME).resolve()),
                          "sha256": sha, "rank": 2, "naming": "peft"}
    assert entry.rank == 2 and bank.get("shaking_hands").rank == 3
    assert entry.base_model == "sdxl (authors' release)"
    assert (bank.weights("hugging")).read_bytes() == (src / AUTHORS_FOLDER / WEIGHT_NAME).read_bytes()

    base = run(pipe.unet)
    for name, state in (("hugging", hug), ("shaking_hands", shake)):
        got = loaded(pipe, bank.weights(name), name)
        assert torch.allclose(got, run(by_hand(pipe.unet, state)), atol=1e-5)
        assert not torch.allclose(got, base, atol=1e-3)
    assert torch.equal(run(pipe.unet), base)  # unloaded again

    # the bank's own loader switches them the same way
    want = run(by_hand(pipe.unet, shake))
    adapters = BankAdapters(pipe, bank)
    try:
        adapters.activate("shaking_hands")
        assert torch.allclose(run(pipe.unet), want, atol=1e-5)
    finally:
        adapters.close()

    # a second scan finds both in the bank already and adds nothing
    again = import_loras(src, bank)
    assert [added for _, added in again] == [False, False] and again[0][0] == bank.get("hugging")


def test_alpha_in_the_file_metadata_is_recorded_and_applied(tmp_path, pipe):
    state = authors_lora(tmp_path / "hug", pipe.unet, 2, rank=2, alpha=4)
    lora = check_lora_file(tmp_path / "hug" / WEIGHT_NAME, unet=pipe.unet)
    assert (lora.rank, lora.alpha, lora.naming) == (2, 4.0, "peft")
    assert lora.modules == tuple(sorted(relationlora_targets(pipe.unet)))
    got = loaded(pipe, tmp_path / "hug" / WEIGHT_NAME, "hug")
    assert torch.allclose(got, run(by_hand(pipe.unet, state, scale=4 / 2)), atol=1e-5)


def test_a_lora_our_trainer_made_imports_and_loads(tmp_path, pipe):
    unet = pipe.unet
    targets = relationlora_targets(unet)
    g0 = torch.Generator().manual_seed(5)
    fixed = {"x": torch.randn(1, 4, 8, 8, generator=g0), "target": torch.randn(1, 4, 8, 8, generator=g0),
             "h": torch.randn(1, 77, 96, generator=g0), "te": torch.randn(1, 32, generator=g0),
             "ids": torch.randn(1, 6, generator=g0)}

    def loss(model, b):
        out = model(b["x"], 500, encoder_hidden_states=b["h"],
                    added_cond_kwargs={"text_embeds": b["te"], "time_ids": b["ids"]}).sample
        return ((out - b["target"]) ** 2).mean()

    settings = TrainerSettings(train_steps=2, gradient_accumulation=1, learning_rate=1e-2)
    out = train_lora(unet, targets, lambda g: fixed, loss, settings, tmp_path / "trained", progress=False)
    lora = check_lora_file(out / WEIGHT_NAME, unet=unet)
    assert (lora.rank, lora.naming, sorted(lora.modules)) == (4, "diffusers", sorted(targets))
    bank = LoraBank(tmp_path / "bank")
    [(entry, added)] = import_loras(out, bank, relation="ours")
    assert added and entry.rank == 4 and entry.info["sha256"] == lora.sha256
    state = safetensors.torch.load_file(str(out / WEIGHT_NAME))
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".up." in k)  # it trained: B is no longer zero
    got = loaded(pipe, bank.weights("ours"), "ours")
    assert torch.allclose(got, run(merged(unet, state)), atol=1e-5)
    assert not torch.allclose(got, run(unet), atol=1e-4)


def test_relation_names_from_folders():
    from pathlib import Path

    assert relation_name(Path(AUTHORS_FOLDER)) == "hugging"
    assert relation_name(Path("lora-trained-xl-shaking_hands")) == "shaking_hands"
    assert relation_name(Path("lora-trained-xl-riding-0.6")) == "riding"
    assert relation_name(Path("hug")) == "hug"


def test_default_bank_follows_relbench_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path))
    assert default_bank() == tmp_path / "relationbooth" / "loras"
    monkeypatch.delenv("RELBENCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_bank() == tmp_path / "home" / ".cache" / "relationbench" / "relationbooth" / "loras"


@pytest.mark.parametrize("kind, message", [
    ("prefix", "not UNet keys"),
    ("attn1", "not LoRA weights of attn2"),
    ("text_encoder", "not UNet keys"),
    ("mixed", "mixes peft"),
    ("no_up", "only its down matrix"),
    ("ranks", "different ranks"),
    ("not_safetensors", "not a readable safetensors file"),
    ("empty", "not a readable safetensors file"),
])
def test_bad_files_name_the_file_and_key(tmp_path, pipe, kind, message):
    folder = tmp_path / "bad"
    names = relationlora_targets(pipe.unet)
    first = names[0]
    extra = {}
    if kind == "prefix":
        extra = {f"{first}.lora_A.weight": torch.zeros(2, 8)}
    elif kind == "attn1":
        attn1 = first.replace("attn2", "attn1")
        extra = {f"unet.{attn1}.lora_A.weight": torch.zeros(2, 8), f"unet.{attn1}.lora_B.weight": torch.zeros(8, 2)}
    elif kind == "text_encoder":
        extra = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)}
    elif kind == "mixed":
        extra = {f"unet.{first}.lora.down.weight": torch.zeros(2, 32)}
    authors_lora(folder, pipe.unet, 3, extra=extra)
    file = folder / WEIGHT_NAME
    if kind in ("no_up", "ranks"):
        state = safetensors.torch.load_file(str(file))
        if kind == "no_up":
            del state[f"unet.{names[5]}.lora_B.weight"]
        else:
            m = pipe.unet.get_submodule(names[5])
            state[f"unet.{names[5]}.lora_A.weight"] = torch.zeros(3, m.in_features)
            state[f"unet.{names[5]}.lora_B.weight"] = torch.zeros(m.out_features, 3)
        safetensors.torch.save_file(state, str(file))
    elif kind == "not_safetensors":
        file.write_bytes(b"PK\x03\x04 a zip, say" * 10)
    elif kind == "empty":
        file.write_bytes(b"")
    with pytest.raises(UserError, match=message) as err:
        check_lora_file(file)
    text = err.value.render()
    assert str(file) in text
    if kind in ("prefix", "attn1", "text_encoder"):
        assert next(iter(extra)) in text  # the offending key itself
    if kind in ("no_up", "ranks"):
        assert names[5] in text
    bank = LoraBank(tmp_path / "bank")
    with pytest.raises(UserError):
        import_loras(folder, bank, relation="bad")
    assert not bank.root.exists() or not any(bank.root.iterdir())  # nothing half-added


def test_a_lora_for_another_unet_is_refused_given_the_unet(tmp_path, pipe):
    state = authors_lora(tmp_path / "x", pipe.unet, 4)
    key = next(k for k in state if k.endswith("attn2.to_k.lora_A.weight"))
    state[key] = torch.zeros(2, 7)  # in_features 7: not this UNet's text width
    safetensors.torch.save_file(state, str(tmp_path / "x" / WEIGHT_NAME))
    check_lora_file(tmp_path / "x" / WEIGHT_NAME)  # consistent on its own
    with pytest.raises(UserError, match="do not fit the UNet") as err:
        check_lora_file(tmp_path / "x" / WEIGHT_NAME, unet=pipe.unet)
    assert key.removeprefix("unet.").removesuffix(".lora_A.weight") in err.value.render()


def test_cli_import(tmp_path, pipe, monkeypatch):
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "loras"
    authors_lora(src / AUTHORS_FOLDER, pipe.unet, 0)
    authors_lora(src / "riding", pipe.unet, 1)
    runner = CliRunner()

    result = runner.invoke(cli, ["lora", "import", str(src)])
    assert result.exit_code == 0, result.output
    assert "hugging" in result.output and "riding" in result.output and "added" in result.output
    bank = LoraBank(tmp_path / "cache" / "relationbooth" / "loras")  # the default bank
    assert [e.name for e in bank.entries()] == ["hugging", "riding"]

    result = runner.invoke(cli, ["lora", "import", str(src)])  # again: nothing new
    assert result.exit_code == 0 and result.output.count("already in the bank") == 2

    # one LoRA needs --relation; with it, into another bank
    result = runner.invoke(cli, ["lora", "import", str(src / "riding")])
    assert result.exit_code == 2 and "--relation" in result.output
    other = tmp_path / "other"
    result = runner.invoke(cli, ["lora", "import", str(src / "riding" / WEIGHT_NAME), "--relation", "ride",
                                 "--bank", str(other)])
    assert result.exit_code == 0, result.output
    assert LoraBank(other).get("ride").info["rank"] == 2
    result = runner.invoke(cli, ["lora", "list", str(other)])
    assert result.exit_code == 0 and "sdxl (authors' release)" in result.output

    # another file under a name the bank holds; a bad key; nothing to scan
    authors_lora(tmp_path / "new", pipe.unet, 9)
    result = runner.invoke(cli, ["lora", "import", str(tmp_path / "new"), "--relation", "ride", "--bank", str(other)])
    assert result.exit_code == 2 and "already holds a different LoRA" in result.output
    authors_lora(tmp_path / "bad", pipe.unet, 9, extra={"unet.conv_in.lora_A.weight": torch.zeros(2, 4)})
    result = runner.invoke(cli, ["lora", "import", str(tmp_path / "bad"), "--relation", "b", "--bank", str(other)])
    assert result.exit_code == 2 and "unet.conv_in.lora_A.weight" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli, ["lora", "import", str(tmp_path / "empty"), "--bank", str(other)])
    assert result.exit_code == 2 and "no subfolder holds" in result.output
