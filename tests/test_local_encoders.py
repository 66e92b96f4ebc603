"""The local encoder's open_clip architectures (paper Table 5: CLIP ViT-L/14, EVA-CLIP-L/14): dense
features of both towers against an explicit recomputation of eq. 8, checkpoint loading, their
identity in what a LoRA learns, the `local_projection` from their width to the image tokens'
(initialized, trained with the RelationLoRA, saved beside it, switched in with it), and the run's
label."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from relationbench.backbones import get_backbone, seeded
from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.methods import Context, default_registry
from relationbench.methods.lora.bank import LoraBank
from relationbench.methods.lora.trainer import MODULES_NAME
from relationbench.methods.msdiffusion.encoder import TINY_IMAGE_ENCODER
from relationbench.methods.msdiffusion.resampler import GroundingResampler
from relationbench.methods.relationbooth.local_encoders import (OPEN_CLIP_ENCODERS, build_tower, load_tower_weights,
                                                               new_projection)
from relationbench.methods.relationbooth.local_tokens import clip_pixels, dense_features, pool_grid
from relationbench.suites import load_suite

from .tiny_env import tiny_env

pytestmark = pytest.mark.usefixtures("one_thread")

VIT, EVA = OPEN_CLIP_ENCODERS["vit-l-14"], OPEN_CLIP_ENCODERS["eva-clip-l-14"]
E = TINY_IMAGE_ENCODER["hidden_size"]  # the tiny resampler's image-token width (1664 on sdxl)


def toy(arch):
    return seeded(0, arch.seed_offset, lambda: build_tower(arch, toy=True))


def pixels(side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))


def entering_last_block(tower, blocks, run) -> torch.Tensor:
    """The hidden states the last block receives during the tower's own forward `run()`."""
    seen = []
    handle = blocks[-2].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


def layer_norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def finish(h, side, norm) -> torch.Tensor:
    """Drop the class token, the final layer norm, L2 over D, to the grid."""
    h = layer_norm(h[:, 1:], norm)
    h = h / h.norm(dim=-1, keepdim=True)
    return h.reshape(h.shape[0], side // 14, side // 14, -1)


def plain_vit(visual, px: torch.Tensor) -> torch.Tensor:
    """Eq. 8 for open_clip's ViT written out: a copy of the tower with its position embedding
    resized to the grid (bicubic) runs its own forward; the last block's value path as matmuls."""
    side = px.shape[-1]
    visual = copy.deepcopy(visual)
    pos = visual.positional_embedding.data
    grid = pos[1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side // 14,) * 2, mode="bicubic", antialias=True, align_corners=False)
    visual.positional_embedding.data = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])
    blocks = visual.transformer.resblocks
    h = entering_last_block(visual, blocks, lambda: visual(px))
    last, d = blocks[-1], h.shape[-1]
    w, b = last.attn.in_proj_weight, last.attn.in_proj_bias
    v = layer_norm(h, last.ln_1) @ w[2 * d:].T + b[2 * d:]
    h = h + v @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    fc = layer_norm(h, last.ln_2) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias
    h = h + (fc * torch.sigmoid(1.702 * fc)) @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias  # QuickGELU
    return finish(h, side, visual.ln_post)


def plain_eva(trunk, px: torch.Tensor) -> torch.Tensor:
    """Eq. 8 for timm's Eva written out: the trunk's own forward_features up to the last block;
    that block's value path (v_proj, the inner layer norm, proj) and SwiGLU MLP as matmuls."""
    h = entering_last_block(trunk, trunk.blocks, lambda: trunk.forward_features(px))
    last = trunk.blocks[-1]
    a, m = last.attn, last.mlp
    v = layer_norm(h, last.norm1) @ a.v_proj.weight.T + a.v_proj.bias
    h = h + layer_norm(v, a.norm) @ a.proj.weight.T + a.proj.bias
    x = layer_norm(h, last.norm2)
    gate, x = x @ m.fc1_g.weight.T + m.fc1_g.bias, x @ m.fc1_x.weight.T + m.fc1_x.bias
    h = h + layer_norm(F.silu(gate) * x, m.norm) @ m.fc2.weight.T + m.fc2.bias
    return finish(h, px.shape[-1], trunk.norm)


@pytest.mark.parametrize("side", [224, 448])
@pytest.mark.parametrize("arch,plain,query", [(VIT, plain_vit, "in_proj_weight"), (EVA, plain_eva, "q_proj.weight")],
                         ids=["vit-l-14", "eva-clip-l-14"])
def test_dense_features_equal_a_plain_computation(arch, plain, query, side):
    tower = toy(arch)
    px = pixels(side)
    with torch.no_grad():
        got = dense_features(tower, px)
    assert got.shape == (2, side // 14, side // 14, arch.tiny.get("width") or arch.tiny["embed_dim"])
    torch.testing.assert_close(got, plain(tower, px), rtol=1e-4, atol=1e-5)
    # the last block's attention is really gone: scaling its queries leaves these as they are
    blocks = getattr(tower, "blocks", None) or tower.transformer.resblocks
    weight = blocks[-1].get_parameter(f"attn.{query}")
    with torch.no_grad():
        weight[: weight.shape[1]].mul_(3.0)  # the q rows (all of q_proj; the first third of in_proj)
        assert torch.equal(dense_features(tower, px), got)


def test_the_toy_towers_are_open_clips_architectures_at_toy_size():
    from open_clip.transformer import QuickGELU, VisionTransformer
    from timm.models.eva import Eva, EvaAttention, EvaBlock

    vit, eva = toy(VIT), toy(EVA)
    assert isinstance(vit, VisionTransformer) and isinstance(vit.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert (vit.patch_size, vit.transformer.width, len(vit.transformer.resblocks)) == ((14, 14), 64, 3)
    assert isinstance(eva, Eva) and type(eva.blocks[0]) is EvaBlock and type(eva.blocks[0].attn) is EvaAttention
    assert (eva.patch_embed.patch_size, eva.embed_dim, len(eva.blocks), eva.rope is not None) == ((14, 14), 32, 3, True)
    assert all(torch.equal(a, b) for a, b in zip(toy(VIT).state_dict().values(), vit.state_dict().values()))  # seeded
    # the real ones, on the meta device: open_clip's ViT-L-14 and EVA02-L-14 towers, 1024 wide, 24 blocks
    from accelerate import init_empty_weights

    with init_empty_weights():
        real_vit, real_eva = build_tower(VIT), build_tower(EVA)
    assert (real_vit.transformer.width, len(real_vit.transformer.resblocks)) == (1024, 24)
    assert (real_eva.embed_dim, len(real_eva.blocks), real_eva.head.out_features) == (1024, 24, 768)
    with torch.device("meta"):  # buffers too (rotary bands)
        for tower in (build_tower(VIT), build_tower(EVA)):
            assert dense_features(tower, torch.empty(1, 3, 896, 896)).shape == (1, 64, 64, 1024)


@pytest.mark.parametrize("arch,prefix", [(VIT, "visual."), (EVA, "visual.trunk.")], ids=["vit-l-14", "eva-clip-l-14"])
def test_an_open_clip_checkpoint_loads_into_the_tower(tmp_path, arch, prefix):
    from accelerate import init_empty_weights

    source = toy(arch)
    path = tmp_path / "clip.pt"
    state = {f"module.{prefix}{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": {**state, "module.token_embedding.weight": torch.ones(3, 2)}}, path)  # + text tower
    with init_empty_weights():
        empty = build_tower(arch, toy=True)
    loaded = load_tower_weights(empty, arch, path).eval()
    px = pixels(224, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(dense_features(loaded, px), dense_features(source, px), rtol=0, atol=0)
    del state[next(iter(state))]
    torch.save(state, tmp_path / "short.pt")
    with init_empty_weights():
        empty = build_tower(arch, toy=True)
    with pytest.raises(UserError, match="missing 1") as caught:
        load_tower_weights(empty, arch, tmp_path / "short.pt")
    assert caught.value.path == str(tmp_path / "short.pt") and f"--weight {arch.weight_key}=" in caught.value.hint
    # the sdxl backbone reads it into the full-size architecture: a toy file does not fit
    method = _method(get_backbone("sdxl", {arch.weight_key: str(path)}), local_encoder=arch.name)
    with pytest.raises(UserError, match="misshapen"):
        method.local_width()


def test_the_projection_starts_orthogonal_and_seeded():
    w = new_projection(64, E, seed=0).weight.detach()
    assert w.shape == (E, 64)
    torch.testing.assert_close(w @ w.T, torch.eye(E), rtol=0, atol=1e-5)  # 64 -> 48: orthonormal rows
    tall = new_projection(16, E, seed=0).weight.detach()
    torch.testing.assert_close(tall.T @ tall, torch.eye(16), rtol=0, atol=1e-5)  # 16 -> 48: norms kept
    assert torch.equal(new_projection(64, E, seed=0).weight, w) and not torch.equal(new_projection(64, E, 1).weight, w)


# -- the method ---------------------------------------------------------------------------------------
def _method(backbone, data_root=None, **settings):
    card = default_registry().card("relationbooth", settings)
    ctx = Context(backbone=backbone, device="cpu", dtype=torch.float32, data_root=data_root, quiet=True)
    return card.build(ctx)


def test_identity_enters_what_a_lora_learns(tmp_path):
    tiny = get_backbone("tiny")
    digests = {name: _method(tiny, local_encoder=name).settings_digest() for name in ("auto", *OPEN_CLIP_ENCODERS)}
    assert len(set(digests.values())) == 3
    vit = _method(tiny, local_encoder="vit-l-14")
    assert vit.local_identity == {"kind": "vit-l-14", "model": "ViT-L-14", "weights": "tiny:seed0", "resolution": 224}
    assert vit.learned()["local_projection"] == "orthogonal" and "local_projection" not in _method(tiny).learned()
    # sdxl: open_clip's tag from the hub cache (not here: refused with the download), or a file, by its sha256
    with pytest.raises(UserError, match="not on this machine") as caught:
        _method(get_backbone("sdxl"), local_encoder="eva-clip-l-14").local_identity
    assert "hf download timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k" in caught.value.hint
    files = []
    for k in range(2):
        files.append(tmp_path / f"vit{k}.safetensors")
        files[-1].write_bytes(bytes([k]) * 8)
    named = [_method(get_backbone("sdxl", {"local_encoder_vit_l": str(f)}), local_encoder="vit-l-14") for f in files]
    assert named[0].local_identity == {"kind": "vit-l-14", "model": "ViT-L-14", "weights": "file",
                                       "source": str(files[0]), "resolution": 896,
                                       "sha256": hashlib.sha256(files[0].read_bytes()).hexdigest()}
    assert named[0].settings_digest() != named[1].settings_digest()
    with pytest.raises(UserError, match="local_encoder must be one of .*'vit-l-14', 'eva-clip-l-14'"):
        default_registry().card("relationbooth", {"local_encoder": "vit-b"}).resolve()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with tiny_env(tmp_path_factory.mktemp("encoders"), ["rb-s-001", "rb-m-001"]) as root:
        yield root


def relbench(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_image_tokens_are_the_local_tokens_through_the_active_projection(env):
    method = _method(get_backbone("tiny"), env / "data", local_encoder="vit-l-14", local_resolution=224)
    try:
        case = load_suite("relationbench").case("rb-s-001")
        method.load()
        ref = Image.open(method.reference(case.subjects[0])).convert("RGB").resize((512, 512), Image.BICUBIC)
        with pytest.raises(RuntimeError, match="need a projection"):
            method.image_tokens([ref])
        projection = new_projection(64, E, seed=4)
        method.use_projection(projection)
        tokens = method.image_tokens([ref])
        with torch.no_grad():
            local = projection(pool_grid(dense_features(method._local.tower, clip_pixels([ref], 224)), 16))
        assert tokens.shape == (1, 257 + 16, E)
        torch.testing.assert_close(tokens[0, 257:], local[0], rtol=1e-5, atol=1e-6)
        # cached tokens follow the projection: another one rejoins the kept features
        path = method.reference(case.subjects[0])
        method.encode_references([path])
        torch.testing.assert_close(method._embeds[path], tokens[0], rtol=1e-5, atol=1e-6)
        other = new_projection(64, E, seed=5)
        method.use_projection(other)
        method.encode_references([path])
        local_raw = method._features[path][1]
        assert local_raw.shape == (16, 64)
        with torch.no_grad():
            torch.testing.assert_close(method._embeds[path][257:], other(local_raw))
        assert torch.equal(method._embeds[path][:257], tokens[0, :257])
    finally:
        method.close()


def test_training_tokens_are_sampling_s_through_the_projection_and_train_it(env, tmp_path):
    """Per step, training joins each reference's features through the projection being trained
    and runs the resampler: the tokens sampling makes with that projection, and a gradient."""
    from relationbench.data.example_triplets import write_example_triplets
    from relationbench.methods.relationbooth.training import RelationBoothLoss, encode_samples, training_scheduler

    samples = write_example_triplets(tmp_path / "t", relations=["hug"]).relations["hug"][:2]
    method = _method(get_backbone("tiny"), env / "data", local_encoder="vit-l-14")
    try:
        method.load()
        projection = new_projection(64, E, seed=2)
        method.use_projection(projection)
        inputs = encode_samples(method, samples, 64, progress=False)
        loss = RelationBoothLoss(method.adapter, training_scheduler(method.pipe), method.settings.kml(), (8, 8),
                                 join=method.join_local)
        for sample, row in zip(samples, inputs):
            assert row.tokens is None and row.local.shape == (len(sample.references), 16, 64)
            got = loss.subject_tokens(row, torch.float32)
            want = method.reference_tokens([r.image for r in sample.references], sample.entities, row.boxes)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got.square().sum().backward()
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    finally:
        method.close()


@pytest.fixture(scope="module")
def trained(env):
    """relbench train --set local_encoder=vit-l-14 on the example triplets' hug (the tiny schedule)."""
    relbench("data", "example-triplets", env / "triplets")
    bank = env / "bank"
    relbench("train", "--data", env / "triplets", "--relation", "hug", "--backbone", "tiny", "--out", bank,
             "--set", "local_encoder=vit-l-14", "--quiet")
    return LoraBank(bank)


def test_training_writes_the_projection_beside_the_lora_and_changes_it(trained):
    from safetensors.torch import load_file

    (entry,) = trained.entries()
    folder = trained.weights(entry.name).parent
    weights = load_file(str(folder / MODULES_NAME))
    assert list(weights) == ["local_projection.weight"]
    start = new_projection(64, E, seed=entry.settings["settings"]["seed"]).weight.detach()
    assert weights["local_projection.weight"].shape == start.shape
    assert (weights["local_projection.weight"] - start).abs().max() > 1e-3  # it trained
    assert entry.settings["modules"] == {"local_projection": {"weight": [E, 64]}}
    assert entry.settings["info"]["local_encoder"]["kind"] == "vit-l-14"
    assert entry.info["settings_digest"] == _method(get_backbone("tiny"), local_encoder="vit-l-14").settings_digest()


def test_generation_switches_in_the_lora_s_projection_and_names_the_encoder(env, trained, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from relationbench.methods.relationbooth import method as rb
    from relationbench.report.aggregate import run_label

    loaded, real, seen, forward = [], rb.projection_from, [], GroundingResampler.forward

    def spy(weight):
        loaded.append(weight)
        return real(weight)

    def resampler_spy(self, image_tokens, *args, **kw):
        seen.append(tuple(image_tokens.shape[1:]))
        return forward(self, image_tokens, *args, **kw)

    monkeypatch.setattr(rb, "projection_from", spy)
    monkeypatch.setattr(GroundingResampler, "forward", resampler_spy)
    common = ["generate", "--method", "relationbooth", "--backbone", "tiny", "--suite", "relationbench",
              "--cases", "rb-s-001,rb-m-001", "--set", f"bank={trained.root}", "--set", "steps=2",
              "--images-per-case", "1", "--quiet"]
    out = tmp_path / "vit"
    relbench(*common, "--set", "local_encoder=vit-l-14", "--out", out)
    (entry,) = trained.entries()
    file = load_file(str(trained.weights(entry.name).parent / MODULES_NAME))["local_projection.weight"]
    assert len(loaded) == 1 and torch.equal(loaded[0], file)  # once for the relation's group, its LoRA's
    assert seen and set(seen) == {(257 + 16, E)}  # every reference: 16 local tokens at the image tokens' width
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["lora"] for r in lines} == {entry.name} and len(lines) == 2
    meta = json.loads((out / "run.json").read_text())
    assert meta["method"]["run"]["label"] == {"local_encoder": "vit-l-14"}
    assert meta["method"]["run"]["local_encoder"]["kind"] == "vit-l-14"
    assert run_label(out) == "vit [local_encoder=vit-l-14]"
    # another encoder never samples with this LoRA (nor the bigG default): it is another setting
    for other in ("eva-clip-l-14", "stock"):
        res = relbench(*common, "--set", f"local_encoder={other}", "--out", tmp_path / other, ok=False)
        assert res.exit_code == 2 and "trained with other settings for hug" in " ".join(res.output.split()), other
        assert not (tmp_path / other).exists()


def test_imported_loras_do_not_stand_in_for_an_open_clip_encoder(tmp_path):
    """A released LoRA has no projection: the bigG encoders may sample with it, the open_clip ones not."""
    from relationbench.methods.relationbooth.selection import RelationLoRAs

    entry = {"name": "hug-imported", "file": "hug-imported/w", "settings": {}, "base": {"name": "tiny"},
             "created": "2024-01-01T00:00:00+00:00", "info": {"relation": "hug"}}
    (tmp_path / "index.json").write_text(json.dumps({"version": 1, "loras": {"hug-imported": entry}}))
    bank = LoraBank(tmp_path)
    assert RelationLoRAs(bank, "tiny", "d").find("hug") == "hug-imported"
    assert RelationLoRAs(bank, "tiny", "d", imported=False).find("hug") is None
    assert not _method(get_backbone("tiny"), local_encoder="eva-clip-l-14").accepts_imported()
    assert _method(get_backbone("tiny")).accepts_imported()


def test_a_lora_without_a_projection_is_refused_by_name(env, trained):
    method = _method(get_backbone("tiny"), env / "data", local_encoder="vit-l-14", local_resolution=224,
                     bank=str(trained.root))
    try:
        method.load()
        (entry,) = trained.entries()
        with pytest.raises(UserError, match=f"RelationLoRA {entry.name} has no local projection") as caught:
            method.use_lora_modules(entry.name, {})
        assert caught.value.path == str(trained.folder(entry.name))
        with pytest.raises(UserError, match=r"shape \(48, 32\)"):
            method.use_lora_modules(entry.name, {"local_projection.weight": torch.zeros(E, 32)})
        method.use_lora_modules(None, {})  # the base model's group: no local tokens (no trained projection)
        ref = Image.fromarray(np.full((512, 512, 3), 90, dtype=np.uint8))
        assert method.image_tokens([ref]).shape == (1, 257, E)
    finally:
        method.close()


# -- the trainer's extra modules ------------------------------------------------------------------------
class Killed(Exception):
    pass


def test_the_trainer_trains_saves_and_resumes_extra_modules(tmp_path):
    """A module the loss applies to its inputs trains with the LoRA: saved beside it, its flags
    put back, and an interrupted training resumes to the uninterrupted values (LoRA and module)."""
    from safetensors.torch import load_file

    from relationbench.methods.lora.files import WEIGHT_NAME
    from relationbench.methods.lora.trainer import TrainerSettings, train_lora

    unet = get_backbone("tiny").sdxl_pipeline().unet
    targets = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")

    def draw(g):
        return {"x": torch.randn(1, 4, 8, 8, generator=g), "t": torch.randint(0, 1000, (1,), generator=g),
                "text": torch.randn(1, 77, 96, generator=g), "pooled": torch.randn(1, 32, generator=g),
                "ids": torch.randn(1, 6, generator=g), "target": torch.randn(1, 4, 8, 8, generator=g)}

    def make(scale: torch.nn.Module, calls: list, die_at: int | None = None):
        def loss(model, b):
            calls.append(1)
            if len(calls) == die_at:
                raise Killed
            pred = model(b["x"], b["t"], encoder_hidden_states=scale(b["text"]),
                         added_cond_kwargs={"text_embeds": b["pooled"], "time_ids": b["ids"]}).sample
            return ((pred - b["target"]) ** 2).mean()
        return loss

    def module():
        layer = torch.nn.Linear(96, 96, bias=False)
        torch.nn.init.eye_(layer.weight)
        return layer.eval().requires_grad_(False)

    s = TrainerSettings(train_steps=3, gradient_accumulation=1, learning_rate=1e-2, checkpoint_every=2)
    whole_module = module()
    whole = train_lora(unet, targets, draw, make(whole_module, []), s, tmp_path / "whole",
                       modules={"scale": whole_module}, progress=False)
    assert not whole_module.training and not whole_module.weight.requires_grad  # flags as they were
    saved = load_file(str(whole / MODULES_NAME))
    assert list(saved) == ["scale.weight"] and torch.equal(saved["scale.weight"], whole_module.weight)
    assert not torch.equal(saved["scale.weight"], torch.eye(96))
    assert json.loads((whole / "lora_settings.json").read_text())["modules"] == {"scale": {"weight": [96, 96]}}

    resumed_module = module()
    with pytest.raises(Killed):
        train_lora(unet, targets, draw, make(resumed_module, [], die_at=3), s, tmp_path / "resumed",
                   modules={"scale": resumed_module}, progress=False)
    resumed_module = module()  # a fresh process: the checkpoint holds the trained values
    out = train_lora(unet, targets, draw, make(resumed_module, []), s, tmp_path / "resumed",
                     modules={"scale": resumed_module}, progress=False)
    for name in (WEIGHT_NAME, MODULES_NAME):
        a, b = load_file(str(whole / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # no modules: no file, and the settings file as before
    plain = train_lora(unet, targets, draw, make(torch.nn.Identity(), []), TrainerSettings(train_steps=1),
                       tmp_path / "p", progress=False)
    assert not (plain / MODULES_NAME).exists()
    assert "modules" not in json.loads((plain / "lora_settings.json").read_text())
