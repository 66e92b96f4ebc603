"""`relbench generate --method relationbooth` on the tiny backbone: the tiny bank trained first
when none is given, LoRAs switched per relation, local tokens reaching the resampler, every
ablation switch changing what it should (and only that), the missing-relation error, the
base-model fallback, and RelationLoRA on plain SDXL (paper Fig. 15)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.methods import Context, default_registry
from relationbench.methods.lora.bank import LoraBank
from relationbench.methods.msdiffusion.resampler import GroundingResampler
from relationbench.methods.relationbooth import RelationBoothMethod
from relationbench.methods.relationbooth.method import relation_key

from .tiny_env import tiny_env

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = "rb-s-006,rb-m-011"  # "ride": one single- and one multi-subject case
FAST = ["--set", "steps=2", "--images-per-case", "1", "--batch-size", "2", "--quiet"]


def relbench(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def manifest(run) -> dict[str, dict]:
    return {r["case_id"]: r for r in map(json.loads, (run / "manifest.jsonl").read_text().splitlines())}


def image(run, case: str) -> bytes:
    return (run / "images" / case / "0.png").read_bytes()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A cache (the default bank) and a data root with references for the cases used here."""
    with tiny_env(tmp_path_factory.mktemp("rbgen"), ["rb-s-006", "rb-m-011", "rb-s-001"]) as root:
        yield root


@pytest.fixture(scope="module")
def auto_run(env):
    """relationbooth on tiny with no bank given: it trains the tiny bank first."""
    out = env / "rb"
    result = relbench("generate", "--method", "relationbooth", "--backbone", "tiny", "--suite", "relationbench",
                      "--cases", CASES, "--out", out, *FAST)
    return out, result.output


def default_bank(env) -> LoraBank:
    return LoraBank(env / "cache" / "relationbooth" / "loras")


def test_tiny_bank_is_trained_first_and_used(env, auto_run):
    out, _ = auto_run
    entries = [e for e in default_bank(env).entries() if e.info["relation"] == "ride"]
    assert len(entries) == 1 and entries[0].base["name"] == "tiny"
    assert entries[0].info["data_sha256"] and entries[0].info["method"] == "relationbooth[steps=2]"
    lines = manifest(out)
    assert sorted(lines) == ["rb-m-011", "rb-s-006"]
    assert {r["lora"] for r in lines.values()} == {entries[0].name}
    assert all("fallback" not in r for r in lines.values())
    # a second run reuses the bank: nothing trained again
    again = relbench("generate", "--method", "relationbooth", "--backbone", "tiny", "--suite", "relationbench",
                     "--cases", CASES, "--out", env / "rb2", *FAST)
    assert len(default_bank(env).entries()) == 1, again.output
    assert image(env / "rb2", "rb-m-011") == image(out, "rb-m-011")


def test_run_json_and_leaderboard_name_the_local_encoder(env, auto_run):
    out, _ = auto_run
    meta = json.loads((out / "run.json").read_text())
    settings = meta["method"]["settings"]
    for key, value in {"local_tokens": 16, "local_resolution": 224, "local_encoder": "auto", "kml_weight": 1e-3,
                       "relation_data": True, "predicate_loss_weight": 0.0, "allow_base_fallback": False}.items():
        assert settings[key] == value, key
    assert meta["method"]["run"]["local_encoder"] == {"kind": "stock", "resolution": 224}
    from relationbench.report.aggregate import _read_run_json

    assert _read_run_json(out)["method"] == "relationbooth[local_encoder=stock,steps=2]"


def test_missing_relations_are_listed_with_the_command_before_any_work(env, tmp_path):
    empty = tmp_path / "empty-bank"
    res = relbench("generate", "--method", "relationbooth", "--backbone", "tiny", "--suite", "relationbench",
                   "--cases", "rb-s-001,rb-s-006", "--set", f"bank={empty}", "--out", tmp_path / "run", *FAST,
                   ok=False)
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "2 relation(s): hug, ride" in text
    assert (f"relbench train --method relationbooth --set steps=2 --data DIR --relation hug --relation ride --backbone tiny "
            f"--out {empty}") in text
    assert not (tmp_path / "run").exists()


def test_a_lora_of_other_settings_is_not_used(env, auto_run, tmp_path):
    """The bank holds ride's LoRA of the card's settings: a variant that trains differently
    (kml off) must not sample with it."""
    res = relbench("generate", "--method", "relationbooth", "--backbone", "tiny", "--suite", "relationbench",
                   "--cases", "rb-s-006", "--set", f"bank={default_bank(env).root}", "--set", "kml_weight=0",
                   "--out", tmp_path / "run", *FAST, ok=False)
    assert res.exit_code == 2
    assert "trained with other settings for ride" in " ".join(res.output.split())


def test_base_fallback_is_msdiffusion_and_recorded(env, tmp_path):
    empty = tmp_path / "empty-bank"
    relbench("generate", "--method", "relationbooth", "--backbone", "tiny", "--suite", "relationbench",
             "--cases", "rb-s-006", "--set", f"bank={empty}", "--set", "allow_base_fallback=true",
             "--out", tmp_path / "rb", *FAST)  # with the default 16 local tokens: none in the base-model group
    relbench("generate", "--method", "msdiffusion", "--backbone", "tiny", "--suite", "relationbench",
             "--cases", "rb-s-006", "--set", "guidance_scale=5.0", "--out", tmp_path / "ms", *FAST)
    line = manifest(tmp_path / "rb")["rb-s-006"]
    assert line["lora"] is None and line["fallback"] == "base model: no RelationLoRA for 'ride'"
    assert image(tmp_path / "rb", "rb-s-006") == image(tmp_path / "ms", "rb-s-006")


# -- the switches, below the command ---------------------------------------------------------------
def _method(env, **settings) -> RelationBoothMethod:
    card = default_registry().card("relationbooth", {k: v for k, v in settings.items()})
    ctx = Context(backbone=get_backbone("tiny"), device="cpu", dtype=torch.float32, data_root=env / "data",
                  quiet=True)
    return card.build(ctx)


@pytest.mark.parametrize("count", [0, 1, 4, 16])
def test_n_local_tokens_reach_the_resampler(env, count, monkeypatch):
    from relationbench.suites import load_suite

    seen = []
    forward = GroundingResampler.forward

    def spy(self, image_tokens, *args, **kw):
        seen.append(image_tokens.shape[1])
        return forward(self, image_tokens, *args, **kw)

    monkeypatch.setattr(GroundingResampler, "forward", spy)
    method = _method(env, local_tokens=count, steps=1, allow_base_fallback=True, bank=str(env / "no-bank"))
    try:
        from relationbench.methods import Request

        case = load_suite("relationbench").case("rb-m-011")
        method.check([case])
        method.load()
        method.generate([Request(case, 0, 5)])  # no LoRA: the base-model group, MS-Diffusion alone
        assert seen and set(seen) == {257}
        seen.clear()
        method.use_lora_modules("a-lora", {})  # a LoRA's group (and training): the local tokens
        method.reference_tokens([method.reference(case.subjects[1])], [case.subjects[1].class_noun],
                                torch.tensor([[0.1, 0.1, 0.9, 0.9]]))  # training's path
        assert seen and set(seen) == {257 + count}
        if count:  # MS-Diffusion's 257 tokens, then the stock tower's pooled dense features at 224 px (tiny)
            from relationbench.methods.msdiffusion import MSDiffusionMethod
            from relationbench.methods.relationbooth.local_tokens import clip_pixels, dense_features, pool_grid

            ref = Image.open(method.reference(case.subjects[0])).convert("RGB").resize((512, 512), Image.BICUBIC)
            tokens = method.image_tokens([ref])
            with torch.no_grad():
                local = pool_grid(dense_features(method._encoder, clip_pixels([ref], 224)), count)
            assert torch.equal(tokens[:, :257], MSDiffusionMethod.image_tokens(method, [ref]))
            torch.testing.assert_close(tokens[0, 257:], local[0].to(tokens.dtype), rtol=1e-5, atol=1e-6)
            method.close()
            method.load()  # reloaded: the stock local tokens come from the new image encoder, not the closed one
            assert method._local.tower is method._encoder
    finally:
        method.close()


def test_each_training_switch_changes_the_lora_key_and_sampling_settings_do_not(env):
    base = _method(env).settings_digest()
    for change in ({"kml_weight": 0.0}, {"kml_weight": 1e-2}, {"local_tokens": 4}, {"local_tokens": 0},
                   {"relation_data": False}, {"predicate_loss_weight": 1e-3}, {"local_resolution": 112}):
        assert _method(env, **change).settings_digest() != base, change
    for same in ({"guidance_scale": 7.5}, {"steps": 5}, {"allow_base_fallback": True}, {"local_encoder": "stock"}):
        assert _method(env, **same).settings_digest() == base, same
    # without local tokens, their resolution and encoder are not learned from
    assert (_method(env, local_tokens=0).settings_digest()
            == _method(env, local_tokens=0, local_resolution=112).settings_digest())


def test_without_relation_aware_data_the_image_prompts_are_blank_and_kml_off(env, tmp_path):
    method = _method(env, relation_data=False)
    try:
        a, b = tmp_path / "a.png", tmp_path / "b.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(a)
        Image.new("RGB", (64, 64), (20, 30, 230)).save(b)
        blank = tmp_path / "blank.png"
        Image.new("RGB", (64, 64), (255, 255, 255)).save(blank)
        boxes = torch.tensor([[0.1, 0.1, 0.6, 0.9], [0.4, 0.1, 0.9, 0.9]])
        off = method.reference_tokens([a, b], ["bear", "tiger"], boxes)
        assert torch.equal(off, method.reference_tokens([b, a], ["bear", "tiger"], boxes))
        on = _method(env)
        try:
            assert torch.allclose(off, on.reference_tokens([blank, blank], ["bear", "tiger"], boxes), atol=1e-6)
            assert not torch.allclose(off, on.reference_tokens([a, b], ["bear", "tiger"], boxes))
        finally:
            on.close()
        assert not method.settings.kml().enabled and method.settings.kml().weight == 0
    finally:
        method.close()


def test_clipself_without_a_checkpoint_is_refused(env):
    with pytest.raises(UserError, match="no CLIPSelf checkpoint"):
        _method(env, local_encoder="clipself").settings_digest()


def test_relation_key():
    assert relation_key("shake hands with") == "shake_hands_with" and relation_key("hug") == "hug"


def test_which_lora_a_relation_samples_with(tmp_path):
    """The newest LoRA of the relation on this backbone trained with these settings (their
    digest); else the newest imported one (no digest); never one of other settings or of
    another backbone."""
    from relationbench.methods.relationbooth.selection import RelationLoRAs

    def entry(name, relation, day, digest=None, backbone="tiny"):
        info = {"relation": relation, **({"settings_digest": digest} if digest else {})}
        return name, {"name": name, "file": f"{name}/w", "settings": {}, "base": {"name": backbone},
                      "created": f"2024-01-0{day}T00:00:00+00:00", "info": info}

    loras = dict([entry("ride-old", "ride", 1, "ours"), entry("ride-new", "ride", 2, "ours"),
                  entry("ride-other", "ride", 3, "theirs"), entry("ride-sdxl", "ride", 4, "ours", "sdxl"),
                  entry("ride-imported", "ride", 5),
                  entry("hug-imported-old", "hug", 1), entry("hug-imported", "hug", 2),
                  entry("hug-other", "hug", 3, "theirs"), entry("hug-sdxl", "hug", 4, backbone="sdxl"),
                  entry("wave-other", "wave", 1, "theirs")])
    (tmp_path / "index.json").write_text(json.dumps({"version": 1, "loras": loras}))
    select = RelationLoRAs(LoraBank(tmp_path), "tiny", "ours", default_bank=False)
    assert [select.find(r) for r in ("ride", "hug", "wave", "sit")] == ["ride-new", "hug-imported", None, None]
    with pytest.raises(UserError, match="2 relation.*wave, sit; it holds LoRAs trained with other settings for wave"):
        select.resolve(["ride", "wave", "sit"])
    assert select.resolve(["ride", "wave"], fallback=True) == {"ride": "ride-new", "wave": None}


# -- RelationLoRA on plain SDXL ----------------------------------------------------------------------
def test_relationlora_on_plain_sdxl(env, auto_run, tmp_path):
    common = ["generate", "--backbone", "tiny", "--suite", "relationbench", "--cases", "rb-s-006", *FAST]
    relbench(*common, "--method", "relationlora-sdxl", "--out", tmp_path / "lora")
    ride = [e.name for e in default_bank(env).entries() if e.info["relation"] == "ride"]
    line = manifest(tmp_path / "lora")["rb-s-006"]
    assert line["lora"] == ride[0] and "references" not in line
    relbench(*common, "--method", "relationlora-sdxl", "--set", f"bank={tmp_path / 'none'}",
             "--set", "allow_base_fallback=true", "--out", tmp_path / "base")
    sdxl = ["--set", "negative_prompt=monochrome, lowres, bad anatomy, worst quality, low quality",
            "--set", "prompt_prefix=best quality, high quality, "]
    relbench(*common, "--method", "sdxl", *sdxl, "--out", tmp_path / "sdxl")
    assert image(tmp_path / "base", "rb-s-006") == image(tmp_path / "sdxl", "rb-s-006")
    assert image(tmp_path / "lora", "rb-s-006") != image(tmp_path / "sdxl", "rb-s-006")


def test_a_clipself_checkpoint_is_used_named_and_keyed(env, auto_run, tmp_path):
    """A CLIPSelf checkpoint (open_clip layout) of the toy tower: its tokens replace the stock
    tower's, run.json and the leaderboard name it, and it gets LoRAs of its own."""
    from relationbench.data import sha256_file
    from relationbench.methods.msdiffusion.encoder import build_tiny_image_encoder
    from relationbench.methods.relationbooth.local_tokens import hf_to_openclip
    from relationbench.report.aggregate import _read_run_json

    tower = build_tiny_image_encoder(0)
    with torch.no_grad():
        tower.vision_model.encoder.layers[-1].mlp.fc2.weight.mul_(1.5)  # "distilled": the last block changed
    checkpoint = tmp_path / "clipself.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in hf_to_openclip(tower.state_dict()).items()}}, checkpoint)
    out = tmp_path / "rb-clipself"
    relbench("generate", "--method", "relationbooth", "--backbone", "tiny", "--suite", "relationbench",
             "--cases", CASES, "--weight", f"local_encoder={checkpoint}", "--out", out, *FAST)
    meta = json.loads((out / "run.json").read_text())
    assert meta["method"]["run"]["local_encoder"] == {"kind": "clipself", "source": str(checkpoint),
                                                      "sha256": sha256_file(checkpoint), "resolution": 224}
    assert _read_run_json(out)["method"] == "relationbooth[local_encoder=clipself,steps=2]"
    ride = [e for e in default_bank(env).entries() if e.info["relation"] == "ride"]
    assert len(ride) == 2  # the stock tower's LoRA and this encoder's
    assert manifest(out)["rb-s-006"]["lora"] != manifest(auto_run[0])["rb-s-006"]["lora"]
    assert image(out, "rb-s-006") != image(auto_run[0], "rb-s-006")
    forced = relbench("generate", "--method", "relationbooth", "--backbone", "tiny", "--suite", "relationbench",
                      "--cases", CASES, "--set", "local_encoder=stock", "--weight", f"local_encoder={checkpoint}",
                      "--out", tmp_path / "forced", *FAST)
    assert image(tmp_path / "forced", "rb-s-006") == image(auto_run[0], "rb-s-006"), forced.output


def test_the_leaderboard_row_names_the_local_encoder(env, auto_run):
    from relationbench.report.aggregate import run_label

    assert run_label(auto_run[0]) == "rb [local_encoder=stock]"


def test_a_fused_lora_samples_as_the_adapter_and_leaves_the_unet_exactly_as_it_was(env, auto_run):
    """fuse_lora merges the relation's LoRA into the UNet while its group samples: images
    within rounding of the unmerged adapter's, and after the run (two relations, so one
    switch) every UNet weight is bit-identical to before."""
    import numpy as np

    from relationbench.methods import Request
    from relationbench.suites import load_suite

    suite = load_suite("relationbench")
    ride, hug = suite.case("rb-m-011"), suite.case("rb-s-001")
    images = {}
    for fuse in (False, True):
        method = _method(env, fuse_lora=fuse, steps=2)
        unet = method.context.backbone.sdxl_pipeline(device="cpu", dtype=torch.float32).unet  # the shared one
        before = {k: v.clone() for k, v in unet.state_dict().items()}
        try:
            method.check([ride, hug])
            method.load()
            images[fuse] = np.asarray(method.generate([Request(ride, 0, 5)])[0].image, dtype=np.int16)
            assert method._adapters._fused == fuse  # merged while the group samples
            copies = {k: copy for k, (_, copy) in method._adapters._base.items()}
            method.generate([Request(hug, 0, 5)])  # switching: ride's LoRA unmerged, hug's merged
            assert method._adapters.active == method.lora_for("hug") != method.lora_for("ride")
            assert method._adapters._fused == fuse and (len(copies) > 0) == fuse
            # the base weights were copied once, not again at the switch
            assert all(method._adapters._base[k][1] is copy for k, copy in copies.items())
        finally:
            method.close()
        after = unet.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), fuse
    assert np.abs(images[True] - images[False]).max() <= 2
