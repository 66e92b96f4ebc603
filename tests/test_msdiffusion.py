"""MS-Diffusion: equivalence with a plain reference of the official rules, strict checkpoint
loading, and the `msdiffusion` method on the tiny backbone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from relationbench.backbones import build_tiny_components
from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.methods.msdiffusion.attention import ImageConditioning, box_cells, level_grid, phrase_attention
from relationbench.methods.msdiffusion.checkpoint import convert, load_checkpoint, read_checkpoint
from relationbench.methods.msdiffusion.model import MSAdapter, attn2_levels, attn2_modules
from relationbench.methods.msdiffusion.resampler import GroundingResampler, ResamplerConfig, fourier_box_embedding

from . import msdiffusion_reference as ref
from .score_runs import make_references

TINY_CFG = ResamplerConfig(dim=32, depth=2, dim_head=8, heads=4, embedding_dim=24, output_dim=96,
                           phrase_embeddings_dim=32)


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its init, so no mapping can pass by symmetry or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


# -- resampler ----------------------------------------------------------------------------------
def test_fourier_layout():
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.5, 0.5, 1.0]])
    expected = torch.tensor([ref.fourier(b.tolist()) for b in boxes])
    torch.testing.assert_close(fourier_box_embedding(boxes), expected, atol=1e-5, rtol=0)  # fp32 angles up to ~56


def test_resampler_matches_reference():
    torch.manual_seed(0)
    model = perturbed(GroundingResampler(TINY_CFG))
    image = torch.randn(3, 257, 24)
    phrase = torch.randn(3, 32)
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.9], [0.4, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 1.0]])
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        ours = model(image, phrase, boxes, drop)
        expected = torch.stack([ref.resampler(model, image[i], phrase[i], boxes[i].tolist(), bool(drop[i]))
                                for i in range(3)])
    assert ours.shape == (3, 16, 96)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# -- masks and the processor -----------------------------------------------------------------------
def test_box_cells_floor_ceil():
    boxes = torch.tensor([[[0.26, 0.0, 0.5, 0.49]]])  # 4x4 grid: x cells 1..1, y cells 0..1
    cells = box_cells(boxes, 4, 4)[0, :, 0].view(4, 4)
    expected = torch.tensor([[ref.in_box([0.26, 0.0, 0.5, 0.49], y, x, 4, 4) for x in range(4)] for y in range(4)])
    assert torch.equal(cells, expected)
    assert not box_cells(torch.zeros(1, 1, 4), 4, 4).any()
    assert level_grid((24, 32), 2) == (6, 8) and level_grid((5, 7), 1) == (3, 4)


@pytest.fixture(scope="module")
def unet_and_adapter():
    parts = build_tiny_components(0)
    unet = parts["unet"]
    cfg = ResamplerConfig(dim=32, depth=1, dim_head=8, heads=4, embedding_dim=24, output_dim=96,
                          phrase_embeddings_dim=32)
    torch.manual_seed(1)
    adapter = perturbed(MSAdapter(unet, cfg))
    perturbed(unet, seed=2)
    return unet, adapter


def _attn2(unet, adapter):
    k, name = next(iter(adapter.index.items()))
    return unet.get_submodule(name), adapter.cross[str(k)]


CASES = {
    # per row: boxes (zeros = unconditional / padding)
    "cfg_two_subjects_overlap": [[[0, 0, 0, 0], [0, 0, 0, 0]], [[0.1, 0.1, 0.6, 0.8], [0.4, 0.3, 0.95, 0.9]]],
    "mixed_counts": [[[0.0, 0.0, 0.5, 1.0], [0, 0, 0, 0]], [[0.2, 0.2, 0.9, 0.7], [0.5, 0.0, 1.0, 0.6]],
                     [[0.3, 0.3, 0.35, 0.37], [0, 0, 0, 0]]],
    # a row without boxes after the leading ones takes part in the branch and adds exactly zero
    "boxless_row_inside": [[[0, 0, 0, 0], [0, 0, 0, 0]], [[0.1, 0.0, 0.7, 0.6], [0, 0, 0, 0]],
                           [[0, 0, 0, 0], [0, 0, 0, 0]], [[0.2, 0.2, 0.9, 0.7], [0.5, 0.0, 1.0, 0.6]]],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("per_subject", [False, True])
def test_processor_matches_reference(unet_and_adapter, case, grid, per_subject):
    unet, adapter = unet_and_adapter
    attn, proc = _attn2(unet, adapter)
    boxes = CASES[case]
    b, s = len(boxes), 2
    h, w = grid
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(b, h * w, attn.to_q.in_features, generator=g)
    text = torch.randn(b, 77, 96, generator=g)
    tokens = torch.randn(b, 4 + s * 16, 96, generator=g)
    box_t = torch.tensor(boxes, dtype=torch.float32)
    for i in range(b):  # the unconditional branch and padding carry zero tokens
        for j in range(s):
            if not any(boxes[i][j]):
                tokens[i, 4 + j * 16 : 4 + (j + 1) * 16] = 0
        if not any(any(bx) for bx in boxes[i]):
            tokens[i] = 0
    subject_scale = [0.7, 0.3] if per_subject else [0.6, 0.6]
    scales = torch.tensor([[subject_scale[j] if any(boxes[i][j]) else 0.0 for j in range(s)] for i in range(b)])
    token_scale = [[1.0] * 4 + [float(scales[i, j]) for j in range(s) for _ in range(16)] for i in range(b)]
    ms = ImageConditioning(tokens, box_t, scales, {proc: (h, w)})
    with torch.no_grad():
        ours = proc(attn, hidden, text, ms=ms)
        again = proc(attn, hidden, text, ms=ms)  # a later step: masks and image keys/values reused
        expected = ref.cross_attention(attn, proc, hidden, text, tokens, boxes, token_scale, h, w)
        text_only = proc(attn, hidden, text)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)
    for i, row in enumerate(boxes):
        if not any(any(bx) for bx in row):
            assert torch.equal(ours[i], text_only[i])
    assert ms.calls.tolist() == [2]


def _rows(rows: list[tuple[torch.Tensor, list, list[int]]]):
    """Rows (tokens [4 + S_i * 16, D], boxes [S_i][4], phrase token positions per subject) packed as
    MSAdapter.conditioning packs them: zero tokens, boxes and scales where a row has fewer subjects."""
    s_max = max(len(boxes) for _, boxes, _ in rows)
    b, d = len(rows), rows[0][0].shape[-1]
    tokens, boxes = torch.zeros(b, 4 + s_max * 16, d), torch.zeros(b, s_max, 4)
    scales, phrases = torch.zeros(b, s_max), torch.zeros(b, s_max, 77)
    for i, (tok, bx, positions) in enumerate(rows):
        tokens[i, : tok.shape[0]] = tok
        boxes[i, : len(bx)], scales[i, : len(bx)] = torch.tensor(bx), 0.6
        for j, at in enumerate(positions):
            phrases[i, j, at] = 1.0
    return tokens, boxes, scales, phrases


@pytest.mark.parametrize("auto", [False, True], ids=["boxes", "auto_layout"])
def test_a_padded_subject_slot_changes_no_bit(unet_and_adapter, auto):
    """Rows of one and two subjects in one batch give, bit for bit, what batches of their own
    kind give: the padding slot of a one-subject row is exactly neutral (over three calls, the
    auto layout switching to attention maps at the second)."""
    unet, adapter = unet_and_adapter
    attn, proc = _attn2(unet, adapter)
    g = torch.Generator().manual_seed(4)
    hidden, text = torch.randn(4, 16, attn.to_q.in_features, generator=g), torch.randn(4, 77, 96, generator=g)
    one = (torch.randn(20, 96, generator=g), [[0.1, 0.0, 0.7, 0.6]], [3])
    two = (torch.randn(36, 96, generator=g), [[0.2, 0.2, 0.9, 0.7], [0.5, 0.0, 1.0, 0.6]], [3, 6])

    def outputs(rows):
        tokens, boxes, scales, phrases = _rows(rows)
        ms = ImageConditioning(tokens, boxes, scales, {proc: (4, 4)}, phrase_mask=phrases if auto else None,
                               mask_threshold=0.5 if auto else None, start_step=2)
        with torch.no_grad():
            return [proc(attn, hidden, text, ms=ms) for _ in range(3)]

    mixed, ones, twos = outputs([one, two, one, one]), outputs([one] * 4), outputs([two] * 4)
    for step in range(3):
        for row in (0, 2, 3):
            assert torch.equal(mixed[step][row], ones[step][row]), (step, row)
        assert torch.equal(mixed[step][1], twos[step][1]), step
    assert not torch.equal(ones[0][0], twos[0][0])  # the rows do differ


def test_phrase_attention_per_subject():
    """Each subject's map is its phrase's mean (over heads and phrase tokens) text attention,
    and the same bits whatever other subject slots sit beside it."""
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(2, 3, 16, 77, generator=g)
    weights = torch.zeros(2, 3, 77)
    weights[0, 0, 3:5], weights[0, 1, 9] = 0.5, 1.0
    weights[1, 0] = torch.rand(77, generator=g) / 38  # row 1: one subject (all tokens weighted), padded
    maps = phrase_attention(probs, weights)
    assert maps.shape == (2, 16, 3)
    torch.testing.assert_close(maps[0, :, 0], probs[0, :, :, 3:5].mean(0).mean(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(maps[0, :, 1], probs[0, :, :, 9].mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(maps[1, :, 0], (probs[1].mean(0) * weights[1, 0]).sum(-1), atol=1e-6, rtol=1e-6)
    assert torch.equal(maps[1, :, 1:], torch.zeros(16, 2))
    assert torch.equal(phrase_attention(probs, weights[:, :1])[..., 0], maps[..., 0])


def test_without_conditioning_the_processor_is_text_attention(unet_and_adapter):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet, adapter = unet_and_adapter
    attn, proc = _attn2(unet, adapter)
    hidden, text = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 77, 96)
    zero = ImageConditioning(torch.zeros(2, 20, 96), torch.zeros(2, 1, 4), torch.zeros(2, 1), {proc: (4, 4)})
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, hidden, text)
        torch.testing.assert_close(proc(attn, hidden, text), stock, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(proc(attn, hidden, text, ms=zero), stock, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_processor_half_precision(unet_and_adapter, dtype):
    import copy

    unet, adapter = unet_and_adapter
    attn, proc = _attn2(unet, adapter)
    attn_h, proc_h = copy.deepcopy(attn).to(dtype), copy.deepcopy(proc).to(dtype)
    hidden, text = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 77, 96)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0]], [[0.2, 0.2, 0.9, 0.9]]])
    tokens, scales = torch.randn(2, 20, 96), torch.full((2, 1), 0.6)
    with torch.no_grad():
        full = proc(attn, hidden, text, ms=ImageConditioning(tokens, boxes, scales, {proc: (4, 4)}))
        half = proc_h(attn_h, hidden.to(dtype), text.to(dtype),
                      ms=ImageConditioning(tokens.to(dtype), boxes, scales, {proc_h: (4, 4)}))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)


# -- fused projections and the processors-in-place check ------------------------------------------------
def unet_call(unet, adapter, seed: int = 6, auto: bool = False):
    """A guided UNet call on a batch of a two-subject and a one-subject row: (args, kwargs,
    conditioning factory). Each factory call builds a fresh conditioning (one sampling call)."""
    g = torch.Generator().manual_seed(seed)
    d, c = unet.config.cross_attention_dim, unet.config.in_channels
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    tokens = [torch.randn(2, 16, d, generator=g), torch.randn(1, 16, d, generator=g)]
    boxes = [torch.tensor([[0.1, 0.1, 0.6, 0.8], [0.4, 0.3, 0.95, 0.9]]), torch.tensor([[0.0, 0.0, 0.5, 1.0]])]
    scales = [torch.tensor([0.6, 0.6]), torch.tensor([0.6])]
    phrases = [torch.zeros(2, 77).index_fill_(1, torch.tensor([3]), 1.0),
               torch.zeros(1, 77).index_fill_(1, torch.tensor([5, 6]), 1.0)] if auto else None
    args = (torch.randn(4, c, 16, 16, generator=g), torch.tensor(500), torch.randn(4, 77, d, generator=g))
    added = {"text_embeds": torch.randn(4, pooled, generator=g), "time_ids": torch.randn(4, 6, generator=g)}
    make = lambda: adapter.conditioning(tokens, boxes, scales, (16, 16), True, phrases,  # noqa: E731
                                        0.5 if auto else None, start_step=1)
    return args, {"added_cond_kwargs": added}, make


def run_unet(unet, call, ms=None):
    args, kwargs, _ = call
    with torch.no_grad():
        return unet(*args, **kwargs, cross_attention_kwargs={"ms": ms} if ms is not None else None).sample


@pytest.fixture
def unet_copy(unet_and_adapter):
    """The perturbed UNet and its adapter, copied together (fusion changes them)."""
    import copy

    return copy.deepcopy(unet_and_adapter)


@pytest.mark.parametrize("auto", [False, True])
def test_fused_projections_give_the_same_output(unet_copy, auto):
    unet, adapter = unet_copy
    call = unet_call(unet, adapter, auto=auto)
    unfused = run_unet(unet, call, call[2]())
    adapter.fuse_projections(unet)
    adapter.check_installed(unet)
    with torch.no_grad():  # from here on only the fused copies can carry the text path's weights
        for module in unet.modules():
            if hasattr(module, "to_k") and module.fused_projections:
                if not module.is_cross_attention:  # attn1's to_qkv carries q too
                    module.to_q.weight.zero_()
                module.to_k.weight.zero_()
                module.to_v.weight.zero_()
    ms = call[2]()
    fused = run_unet(unet, call, ms)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    adapter.check_installed(unet, ms)


def test_diffusers_fusion_is_refused_with_the_fix(unet_copy):
    unet, adapter = unet_copy
    call = unet_call(unet, adapter)
    expected = run_unet(unet, call, call[2]())
    unet.fuse_qkv_projections()  # replaces every processor with diffusers' stock fused one
    with pytest.raises(UserError, match=r"(?s)not in place: 11 of 11 attn2 layers run FusedAttnProcessor2_0.*"
                                        r"MSAdapter.fuse_projections"):
        adapter.check_installed(unet)
    adapter.fuse_projections(unet)  # the fix the message names
    ms = call[2]()
    torch.testing.assert_close(run_unet(unet, call, ms), expected, atol=1e-5, rtol=1e-5)
    adapter.check_installed(unet, ms)


def test_swapped_processors_and_a_dropped_conditioning_are_named(unet_copy):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet, adapter = unet_copy
    call = unet_call(unet, adapter)
    ms = call[2]()
    run_unet(unet, call)  # the UNet ran, but without `ms`
    with pytest.raises(UserError, match="11 of 11 attn2 layers did not receive the image conditioning"):
        adapter.check_installed(unet, ms)
    name = adapter.index[1]
    unet.get_submodule(name).set_processor(AttnProcessor2_0())
    with pytest.raises(UserError, match=f"1 of 11 attn2 layers run AttnProcessor2_0 .e.g. {name}"):
        adapter.check_installed(unet)


def test_fusion_never_bypasses_a_live_lora(unet_copy):
    from peft import LoraConfig

    unet, adapter = unet_copy
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]), adapter_name="r")
    with pytest.raises(UserError, match="(?s)would bypass the LoRA on .*attn1.to_k.*fuse_lora"):
        adapter.fuse_projections(unet)
    unet.delete_adapters("r")
    adapter.fuse_projections(unet)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn2.to_v"]), adapter_name="late")
    with pytest.raises(UserError, match="(?s)bypass the LoRA on .*attn2.to_v.*added after fusing"):
        adapter.check_installed(unet)


# -- checkpoint ---------------------------------------------------------------------------------------
def official_layout(unet, cfg: ResamplerConfig, seed: int = 5) -> dict:
    """A checkpoint in the official layout built from REFERENCE 1's key list, not from our modules."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    d, q, gd, inner, ff = cfg.dim, cfg.num_queries, cfg.grounding_dim, cfg.heads * cfg.dim_head, cfg.dim * cfg.ff_mult
    proj = {"grounding_latents": r(1, q, d), "latent_proj.0.weight": r(2 * gd, gd), "latent_proj.0.bias": r(2 * gd),
            "latent_proj.2.weight": r(d * q, 2 * gd), "latent_proj.2.bias": r(d * q)}
    for name, width in (("latent_norm", d), ("attention_norm", d), ("norm_out", cfg.output_dim)):
        proj[f"{name}.weight"], proj[f"{name}.bias"] = r(width), r(width)
    proj.update({"proj_in.weight": r(d, cfg.embedding_dim), "proj_in.bias": r(d),
                 "proj_out.weight": r(cfg.output_dim, d), "proj_out.bias": r(cfg.output_dim)})
    for i in range(cfg.depth):
        for n in ("norm1", "norm2"):
            proj[f"layers.{i}.0.{n}.weight"], proj[f"layers.{i}.0.{n}.bias"] = r(d), r(d)
        proj[f"layers.{i}.0.to_q.weight"] = r(inner, d)
        proj[f"layers.{i}.0.to_kv.weight"] = r(2 * inner, d)
        proj[f"layers.{i}.0.to_out.weight"] = r(d, inner)
        proj[f"layers.{i}.1.0.weight"], proj[f"layers.{i}.1.0.bias"] = r(d), r(d)
        proj[f"layers.{i}.1.1.weight"], proj[f"layers.{i}.1.3.weight"] = r(ff, d), r(d, ff)
    adapter = {}
    for k, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            module = unet.get_submodule(name.removesuffix(".processor"))
            hidden, cross = module.to_k.out_features, module.to_k.in_features
            adapter[f"{k}.to_k_ip.weight"], adapter[f"{k}.to_v_ip.weight"] = r(hidden, cross), r(hidden, cross)
    return {"image_proj": proj, "ms_adapter": adapter,
            "dummy_image_tokens": r(1, 4, unet.config.cross_attention_dim)}


@pytest.fixture
def fresh():
    parts = build_tiny_components(0)
    return parts["unet"], MSAdapter(parts["unet"], TINY_CFG)


def test_attn2_indices_come_from_the_unet(fresh):
    unet, adapter = fresh
    names = list(unet.attn_processors)
    assert all(names[k].endswith("attn2.processor") for k in adapter.index)
    assert len(adapter.index) == sum(n.endswith("attn2.processor") for n in names)
    assert sorted(adapter.index) == [k for k, n in enumerate(names) if "attn2" in n]
    assert attn2_modules(unet) == adapter.index


def test_attn2_levels_match_the_cells_each_layer_sees(fresh):
    """The level read from a layer's place in the UNet gives the grid it really runs at (H != W)."""
    unet, adapter = fresh
    seen = {}

    def hook(k):
        def record(module, args):
            seen[k] = args[0].shape[1]
        return record

    hooks = [unet.get_submodule(name).register_forward_pre_hook(hook(k)) for k, name in adapter.index.items()]
    latent = (10, 14)  # H != W, and odd at level 1 (5 x 7): level 2 rounds up to 3 x 4
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    with torch.no_grad():
        unet(torch.randn(1, 4, *latent), 10, torch.randn(1, 77, 96),
             added_cond_kwargs={"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)})
    for hook in hooks:
        hook.remove()
    levels = attn2_levels(unet)
    assert sorted(set(levels.values())) == [1, 2]  # tiny: attention at two of its three levels
    assert seen == {k: math.prod(level_grid(latent, level)) for k, level in levels.items()}
    assert set(seen.values()) == {5 * 7, 3 * 4}


def test_official_checkpoint_loads_strictly(fresh, tmp_path):
    unet, adapter = fresh
    state = official_layout(unet, TINY_CFG)
    path = tmp_path / "ms_adapter.bin"
    torch.save(state, path)
    load_checkpoint(adapter, read_checkpoint(path), path)
    for key, value in state["image_proj"].items():
        assert torch.equal(adapter.resampler.state_dict()[key], value), key
    for key, value in state["ms_adapter"].items():
        k, _, name = key.partition(".")
        assert torch.equal(adapter.cross[k].state_dict()[name], value), key
        # ... and the processor at index k is the one installed on that attn2 module
        module = unet.get_submodule(list(unet.attn_processors)[int(k)].removesuffix(".processor"))
        assert module.processor is adapter.cross[k]
    assert torch.equal(adapter.dummy_image_tokens, state["dummy_image_tokens"])
    # the safetensors conversion loads to the same weights
    converted = tmp_path / "ms_adapter.safetensors"
    assert convert(path, converted) == len(state["image_proj"]) + len(state["ms_adapter"]) + 1
    again = read_checkpoint(converted)
    assert all(torch.equal(again["image_proj"][k], v) for k, v in state["image_proj"].items())
    assert torch.equal(again["dummy_image_tokens"], state["dummy_image_tokens"])


@pytest.mark.parametrize("break_it,words", [
    (lambda s: s["image_proj"].update({"proj_inn.weight": s["image_proj"].pop("proj_in.weight")}),
     ["missing proj_in.weight", "unexpected proj_inn.weight"]),
    (lambda s: s["ms_adapter"].update({"1.to_k_ip.weight": s["ms_adapter"]["1.to_k_ip.weight"][:, :-1]}),
     ["wrong shape 1.to_k_ip.weight"]),
    (lambda s: s["ms_adapter"].pop(sorted(s["ms_adapter"])[-1]), ["ms_adapter: missing"]),
    (lambda s: s.update({"dummy_image_tokens": torch.zeros(1, 5, 96)}), ["dummy_image_tokens: shape"]),
])
def test_checkpoint_that_does_not_fit_is_refused(fresh, tmp_path, break_it, words):
    unet, adapter = fresh
    state = official_layout(unet, TINY_CFG)
    break_it(state)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    with pytest.raises(UserError) as err:
        load_checkpoint(adapter, state, "ms_adapter.bin")
    for word in words:
        assert word in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in adapter.state_dict().items())  # nothing half-loaded


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "ms_adapter.bin"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(UserError, match="top-level keys"):
        read_checkpoint(bad)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.bin")


def test_wrong_image_encoder_is_named(monkeypatch, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from relationbench.backbones import get_backbone
    from relationbench.methods import Context
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings
    from relationbench.methods.msdiffusion import method as ms_method

    vit_h = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=224, patch_size=14))
    monkeypatch.setattr(ms_method, "load_image_encoder", lambda backbone: vit_h)
    method = MSDiffusionMethod(MSDiffusionSettings(steps=1), Context(get_backbone("tiny"), "cpu", torch.float32, tmp_path))
    with pytest.raises(UserError, match="ViT-bigG/14 vision tower .hidden size 48.*hidden size 1024.*ViT-H"):
        method.encode_references([str(tmp_path / "x.jpg")])


# -- the method --------------------------------------------------------------------------------------------
@pytest.fixture
def ms_card(tmp_path):
    card = tmp_path / "ms-fast.yaml"
    card.write_text("name: ms-fast\nadapter: relationbench.methods.msdiffusion:MSDiffusionMethod\n"
                    "settings: {steps: 3}\n")
    return card


CASE_IDS = ["rb-s-001", "rb-m-001", "rb-m-002", "rb-s-002"]


def _generate(card, out, *extra):
    res = CliRunner().invoke(cli, ["generate", "--method", str(card), "--backbone", "tiny", "--quiet",
                                   "--cases", ",".join(CASE_IDS), "--out", str(out), *extra])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_generate_single_and_multi(tmp_path, monkeypatch, ms_card):
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    monkeypatch.setenv("RELBENCH_DATA", str(data))
    make_references(data, CASE_IDS)
    batched = _generate(ms_card, tmp_path / "b4", "--batch-size", "4")
    assert sorted(r["case_id"] for r in batched) == sorted(CASE_IDS)
    for r in batched:
        assert len(r["references"]) == len(r["subjects"]) and all(str(data) in p for p in r["references"])
        assert r["prompt"].startswith("best quality, high quality, ")
    # rows with different subject counts in one batch give the images of one-by-one sampling
    single = _generate(ms_card, tmp_path / "b1", "--batch-size", "1", "--no-batch-invariant")
    for r in single:
        a = np.asarray(Image.open(tmp_path / "b1" / r["path"]), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b4" / r["path"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 2, r["case_id"]


MIXED_IDS = ["rb-s-001", "rb-m-011", "rb-s-003", "rb-m-049"]


@pytest.mark.parametrize("layout", ["boxes", "auto"])
def test_mixed_subject_counts_never_change_an_image(tmp_path, one_thread, layout):
    """The run loop on the CPU (batches padded to 4 with the last request): batch size 1 samples
    every case alone ([s, s, s, s]); 2 gives [s, m, m, m], 3 [s, m, s, s] then [m, m, m, m], 4
    [s, m, s, m]. A one-subject row beside two-subject rows (its subject slot padded) must
    come out byte for byte as alone; so must the two-subject rows."""
    from relationbench.generate import GenerateOptions, generate

    data = tmp_path / "data"
    make_references(data, MIXED_IDS)
    card = tmp_path / "ms-mixed.yaml"
    auto = ", mask_threshold: 0.5, start_step: 1" if layout == "auto" else ""
    card.write_text("name: ms-mixed\nadapter: relationbench.methods.msdiffusion:MSDiffusionMethod\n"
                    f"settings: {{steps: 3{auto}}}\n")
    images = {}
    for size in (1, 2, 3, 4):
        out = tmp_path / f"b{size}"
        generate(GenerateOptions(method=str(card), suite="relationbench", backbone="tiny", cases=MIXED_IDS,
                                 images_per_case=1, batch_size=size, out=str(out), data_dir=str(data), quiet=True))
        images[size] = {p.parent.name: p.read_bytes() for p in (out / "images").rglob("*.png")}
    assert sorted(images[1]) == sorted(MIXED_IDS)
    for size in (2, 3, 4):
        changed = [case for case in MIXED_IDS if images[size][case] != images[1][case]]
        assert not changed, f"batch size {size} changed {changed}"


def test_no_state_between_calls(tmp_path, monkeypatch):
    from relationbench.backbones import get_backbone
    from relationbench.methods import Context, Request
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings
    from relationbench.suites import load_suite

    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path))
    make_references(tmp_path, ["rb-m-001", "rb-s-001"])
    suite = load_suite("relationbench")
    method = MSDiffusionMethod(MSDiffusionSettings(steps=2, height=96, width=128),
                               Context(get_backbone("tiny"), "cpu", torch.float32, tmp_path))
    req = [Request(suite.case("rb-m-001"), 0, 11)]
    first = method.generate(req)[0].image
    method.generate([Request(suite.case("rb-s-001"), 0, 12)])
    again = method.generate(req)[0].image
    assert first.size == (128, 96)  # height != width
    assert first.tobytes() == again.tobytes()


def test_generate_checks_its_processors_at_the_first_step(tmp_path):
    """diffusers' fusion on the method's UNet stops generate with the fix; the adapter's own
    fusion samples the same image."""
    from relationbench.backbones import get_backbone
    from relationbench.methods import Context, Request
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings
    from relationbench.suites import load_suite

    make_references(tmp_path, ["rb-m-001"])
    method = MSDiffusionMethod(MSDiffusionSettings(steps=2), Context(get_backbone("tiny"), "cpu", torch.float32, tmp_path))
    req = [Request(load_suite("relationbench").case("rb-m-001"), 0, 3)]
    unfused = method.generate(req)[0].image
    method.pipe.unet.fuse_qkv_projections()
    with pytest.raises(UserError, match="fuse_qkv_projections"):
        method.generate(req)
    method.adapter.fuse_projections(method.pipe.unet)
    assert method.generate(req)[0].image.tobytes() == unfused.tobytes()


def test_convert_command(fresh, tmp_path):
    unet, _ = fresh
    src, dst = tmp_path / "ms_adapter.bin", tmp_path / "ms_adapter.safetensors"
    torch.save(official_layout(unet, TINY_CFG), src)
    res = CliRunner().invoke(cli, ["convert", "msdiffusion", str(src), str(dst)])
    assert res.exit_code == 0, res.output
    adapter = MSAdapter(build_tiny_components(0)["unet"], TINY_CFG)
    load_checkpoint(adapter, read_checkpoint(dst), dst)
    res = CliRunner().invoke(cli, ["convert", "msdiffusion", str(src), str(dst)])
    assert res.exit_code == 2 and "--force" in res.output
    (tmp_path / "bad.bin").write_bytes(b"junk")
    res = CliRunner().invoke(cli, ["convert", "msdiffusion", str(tmp_path / "bad.bin"), str(tmp_path / "o.st")])
    assert res.exit_code == 2 and not (tmp_path / "o.st").exists()


def test_sdxl_without_adapter_weights_stops_before_work(tmp_path, monkeypatch):
    """On sdxl every weight MS-Diffusion loads is checked first: a missing ms_adapter.bin is
    named (with the fix) before anything is written."""
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text("{}")
    encoder = tmp_path / "image_encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    make_references(tmp_path / "data", ["rb-s-001"])
    res = CliRunner().invoke(cli, ["generate", "--method", "msdiffusion", "--cases", "rb-s-001", "--out",
                                   str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
                                   "--weight", f"sdxl={sdxl}", "--weight", f"image_encoder={encoder}"])
    assert res.exit_code == 2 and "msdiffusion" in res.output and "hf download doge1516/MS-Diffusion" in res.output
    assert not (tmp_path / "run").exists()


# -- auto layout ----------------------------------------------------------------------------------------
def test_auto_layout_masks_follow_recorded_attention(unet_and_adapter):
    """Before start_step calls a layer uses the boxes; from then on the mean phrase attention
    of all its calls so far, min-max normalized per map and thresholded."""
    unet, adapter = unet_and_adapter
    attn, proc = _attn2(unet, adapter)
    g = torch.Generator().manual_seed(4)
    hiddens = [torch.randn(2, 16, attn.to_q.in_features, generator=g) for _ in range(3)]
    text = torch.randn(2, 77, 96, generator=g)
    boxes = torch.tensor([[[0, 0, 0, 0]], [[0.0, 0.0, 0.5, 0.5]]])
    tokens, scales = torch.randn(2, 20, 96, generator=g), torch.tensor([[0.0], [0.6]])
    tokens[0] = 0
    phrase = torch.zeros(2, 1, 77)
    phrase[1, 0, 3:5] = 1
    ms = ImageConditioning(tokens, boxes, scales, {proc: (4, 4)}, phrase_mask=phrase, mask_threshold=0.5, start_step=3)

    def head_probs(hidden):  # row 1's text attention by hand: [heads, 16, 77]
        q = attn.to_q(hidden[1]).view(16, attn.heads, -1).transpose(0, 1)
        k = attn.to_k(text[1]).view(77, attn.heads, -1).transpose(0, 1)
        return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)

    with torch.no_grad():
        first = proc(attn, hiddens[0], text, ms=ms)
        plain = proc(attn, hiddens[0], text, ms=ImageConditioning(tokens, boxes, scales, {proc: (4, 4)}))
        torch.testing.assert_close(first, plain)  # one call < start_step: boxes
        proc(attn, hiddens[1], text, ms=ms)
        bias, fg = ms.step(proc, 16, head_probs(hiddens[2])[None])  # the third call reaches start_step
        m = torch.stack([head_probs(h).mean(0)[:, 3:5].mean(-1) for h in hiddens]).mean(0)  # [16]
        inside = ((m - m.min()) / (m.max() - m.min() + 1e-5) > 0.5)[:, None]
    assert ms.calls.tolist() == [3]
    assert 0 < inside.sum() < 16
    assert torch.equal(fg[0].bool(), inside)
    assert torch.equal(bias[0, 0, :, 4:] == 0, inside.expand(-1, 16))
    assert torch.equal(bias[0, 0, :, :4] == 0, ~inside.expand(-1, 4))


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_auto_layout_output_matches_reference(unet_and_adapter, grid):
    """Before start_step the processor's output is the boxes' (reference with boxes); at
    start_step, the reference's with the regions the auto layout's rules give, computed cell
    by cell from the text attention of every call so far. Rows: the unconditional one (zero
    tokens, zero boxes), a two-subject row, and a one-subject row padded to two."""
    unet, adapter = unet_and_adapter
    attn, proc = _attn2(unet, adapter)
    h, w = grid
    g = torch.Generator().manual_seed(8)
    hiddens = [torch.randn(3, h * w, attn.to_q.in_features, generator=g) for _ in range(2)]
    text = torch.randn(3, 77, 96, generator=g)
    boxes = [[[0, 0, 0, 0], [0, 0, 0, 0]], [[0.0, 0.0, 0.5, 0.6], [0.4, 0.3, 1.0, 1.0]],
             [[0.2, 0.1, 0.9, 0.8], [0, 0, 0, 0]]]
    phrase_tokens = [[[], []], [[3], [6, 7]], [[4, 5], []]]
    tokens = torch.randn(3, 4 + 2 * 16, 96, generator=g)
    tokens[0] = 0
    tokens[2, 4 + 16 :] = 0
    scales = torch.tensor([[0.0, 0.0], [0.7, 0.3], [0.6, 0.0]])
    token_scale = [[1.0] * 4 + [float(scales[i, j]) for j in range(2) for _ in range(16)] for i in range(3)]
    phrase = torch.zeros(3, 2, 77)
    for i, row in enumerate(phrase_tokens):
        for j, positions in enumerate(row):
            phrase[i, j, positions] = 1
    ms = ImageConditioning(tokens, torch.tensor(boxes, dtype=torch.float32), scales, {proc: grid},
                           phrase_mask=phrase, mask_threshold=0.5, start_step=2)
    with torch.no_grad():
        first = proc(attn, hiddens[0], text, ms=ms)
        second = proc(attn, hiddens[1], text, ms=ms)
        regions = ref.auto_regions(attn, hiddens, text, phrase_tokens, 0.5, w)
        args = (attn, proc, hiddens[1], text, tokens, boxes, token_scale, h, w)
        expected = ref.cross_attention(*args, regions=regions)
        with_boxes = ref.cross_attention(*args)
        torch.testing.assert_close(first, ref.cross_attention(attn, proc, hiddens[0], *args[3:]), atol=1e-5, rtol=1e-5)
    for j in range(2):  # the regions are neither empty nor everything, nor the boxes
        assert 0 < len(regions[1][j]) < h * w
    assert regions[1][0] != {(y, x) for y in range(h) for x in range(w) if ref.in_box(boxes[1][0], y, x, h, w)}
    assert regions[2][1] == set() and regions[0] == [set(), set()]
    assert not torch.allclose(expected, with_boxes, atol=1e-3)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=1e-5)


def test_phrase_mask_positions(tmp_path):
    from relationbench.backbones import get_backbone
    from relationbench.methods import Context
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings

    method = MSDiffusionMethod(MSDiffusionSettings(steps=1), Context(get_backbone("tiny"), "cpu", torch.float32, tmp_path))
    prompt = "best quality, high quality, a dog hugging a bear plushie next to a dog"
    mask = method.phrase_mask(prompt, ["dog", "bear plushie"])
    ids = method.pipe.tokenizer(prompt, max_length=77, padding="max_length").input_ids
    words = [method.pipe.tokenizer.decode([i for i, on in zip(ids, row) if on]).strip() for row in mask.tolist()]
    assert words == ["dog", "bear plushie"]
    assert mask[0].nonzero().max() < mask[1].nonzero().min()  # the first dog, not the last
    with pytest.raises(UserError, match="not among the tokens"):
        method.phrase_mask(prompt, ["cat"])


def test_auto_layout_generates_and_keeps_no_state(tmp_path, monkeypatch):
    from relationbench.backbones import get_backbone
    from relationbench.methods import Context, Request
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings
    from relationbench.suites import load_suite

    make_references(tmp_path, ["rb-m-001"])
    req = [Request(load_suite("relationbench").case("rb-m-001"), 0, 5)]
    ctx = Context(get_backbone("tiny"), "cpu", torch.float32, tmp_path)
    auto = MSDiffusionMethod(MSDiffusionSettings(steps=4, mask_threshold=0.5, start_step=2), ctx)
    boxes = MSDiffusionMethod(MSDiffusionSettings(steps=4), Context(get_backbone("tiny"), "cpu", torch.float32, tmp_path))
    a1, a2 = auto.generate(req)[0].image, auto.generate(req)[0].image
    assert a1.tobytes() == a2.tobytes()
    assert a1.tobytes() != boxes.generate(req)[0].image.tobytes()
