"""Backbone presets: lookup errors, the tiny build, tokenizers, offline behaviour, local loading."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # REFERENCE 6: never let a test reach for the hub

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from relationbench.backbones import (
    PRESETS,
    TINY,
    Backbone,
    WeightSource,
    build_clip_tokenizers,
    build_tiny_components,
    get_backbone,
)
from relationbench.errors import UserError

PROMPTS = [
    "a dog hugging a cat",
    "A photo of sks Dog, riding   a bike in the rain",
    "best quality, high quality, two cats shaking hands on a beach at sunset",
    "a teddy bear on top of a red backpack (3D render)",
]


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = get_backbone("tiny").sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


# --------------------------------------------------------------------------- lookup


def test_presets_and_describe():
    assert set(PRESETS) == {"sdxl", "tiny"}
    sdxl = get_backbone("sdxl")
    assert isinstance(sdxl, Backbone) and sdxl.name == "sdxl" and not sdxl.is_tiny
    assert sdxl.resolution == 1024
    info = sdxl.describe()
    assert info["name"] == "sdxl" and info["resolution"] == 1024
    assert info["weights"]["sdxl"] == {"kind": "hub", "location": "stabilityai/stable-diffusion-xl-base-1.0"}
    assert info["weights"]["image_encoder"]["subfolder"] == "sdxl_models/image_encoder"
    assert info["weights"]["msdiffusion"]["filename"] == "ms_adapter.bin"
    assert info["weights"]["clip"] == {"kind": "open_clip", "location": "openai", "model": "ViT-B-32"}
    tiny = get_backbone("tiny")
    assert tiny.is_tiny and tiny.resolution == 128 and tiny.describe()["random_seed"] == 0


def test_unknown_preset_lists_presets():
    with pytest.raises(UserError) as err:
        get_backbone("sdxI")
    text = str(err.value)
    assert "did you mean 'sdxl'" in text and "sdxl, tiny" in text


def test_unknown_override_key_lists_keys():
    with pytest.raises(UserError) as err:
        get_backbone("sdxl", {"unte": "/tmp"})
    assert "image_encoder" in str(err.value) and "msdiffusion" in str(err.value)
    with pytest.raises(UserError, match="no weights to override"):
        get_backbone("tiny", {"sdxl": "/tmp"})


def test_override_to_missing_local_path(tmp_path):
    missing = tmp_path / "nowhere" / "sdxl"
    with pytest.raises(UserError) as err:
        get_backbone("sdxl", {"sdxl": str(missing)})
    assert err.value.path == str(missing) and "no such file or folder" in str(err.value)


def test_override_forms(tmp_path):
    bb = get_backbone(
        "sdxl",
        {
            "sdxl": str(tmp_path),
            "image_encoder": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k:",
            "msdiffusion": "someone/fork:ckpt/adapter.safetensors",
            "dino": "facebook/dino-vitb16",
            "clip": "laion2b_s34b_b79k",
        },
    )
    w = bb.weights
    assert w["sdxl"] == WeightSource.local(tmp_path)
    assert w["image_encoder"] == WeightSource.hub("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
    assert w["msdiffusion"] == WeightSource.hub("someone/fork", subfolder="ckpt", filename="adapter.safetensors")
    assert w["dino"] == WeightSource.hub("facebook/dino-vitb16")
    assert w["clip"] == WeightSource.open_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert get_backbone("sdxl", {"msdiffusion": "someone/fork"}).weights["msdiffusion"].filename == "ms_adapter.bin"
    assert bb.describe()["overridden"] == ["clip", "dino", "image_encoder", "msdiffusion", "sdxl"]


# --------------------------------------------------------------------------- offline


def test_sdxl_offline_without_weights_fails_fast(empty_hf_cache):
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        get_backbone("sdxl").check_available()
    assert time.perf_counter() - start < 5
    text = str(err.value)
    assert "--backbone tiny" in text and "hf download stabilityai/stable-diffusion-xl-base-1.0" in text
    assert "--weight sdxl=" in text and "HF_HUB_OFFLINE" in text


def test_sdxl_pipeline_offline_raises_user_error(empty_hf_cache):
    with pytest.raises(UserError, match="--backbone tiny"):
        get_backbone("sdxl").sdxl_pipeline()


def test_online_probe_gives_up_quickly(empty_hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        get_backbone("sdxl").check_available(("msdiffusion",))
    assert time.perf_counter() - start < 5
    assert "hf download doge1516/MS-Diffusion ms_adapter.bin" in str(err.value)
    assert "--weight msdiffusion=/path/to/ms_adapter.bin" in str(err.value)


def test_file_component_local_overrides(tmp_path):
    (tmp_path / "ms_adapter.bin").write_bytes(b"x")
    as_file = get_backbone("sdxl", {"msdiffusion": str(tmp_path / "ms_adapter.bin")})
    as_folder = get_backbone("sdxl", {"msdiffusion": str(tmp_path)})
    assert as_file.check_available(("msdiffusion",)) == {"msdiffusion": tmp_path / "ms_adapter.bin"}
    assert as_folder.fetch("msdiffusion") == tmp_path / "ms_adapter.bin"
    (tmp_path / "ms_adapter.bin").unlink()
    with pytest.raises(UserError, match="single file"):
        as_folder.check_available(("msdiffusion",))


def test_cached_file_component_is_found(empty_hf_cache):
    # a hand-made HF cache entry (the layout huggingface_hub writes) counts as a local copy
    repo = empty_hf_cache / "hf" / "hub" / "models--doge1516--MS-Diffusion"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "ms_adapter.bin").write_bytes(b"x")
    found = get_backbone("sdxl").check_available(("msdiffusion",))
    assert found["msdiffusion"] == snap / "ms_adapter.bin"


def test_tiny_is_always_available(empty_hf_cache):
    assert get_backbone("tiny").check_available(("sdxl", "msdiffusion")) == {}


def test_local_folder_without_model_index(tmp_path):
    with pytest.raises(UserError, match="diffusers layout"):
        get_backbone("sdxl", {"sdxl": str(tmp_path)}).check_available()


# --------------------------------------------------------------------------- tiny build


def test_tiny_unet_has_sdxl_structure(tiny_pipe):
    unet = tiny_pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    attn2 = [name for name in unet.attn_processors if ".attn2." in name]
    for prefix in ("down_blocks.1.", "down_blocks.2.", "up_blocks.0.", "up_blocks.1.", "mid_block."):
        assert any(n.startswith(prefix) for n in attn2), prefix
    assert not any(n.startswith(("down_blocks.0.", "up_blocks.2.")) for n in attn2)
    cfg = unet.config
    te1, te2 = tiny_pipe.text_encoder.config, tiny_pipe.text_encoder_2.config
    assert cfg.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert cfg.projection_class_embeddings_input_dim == te2.projection_dim + 6 * cfg.addition_time_embed_dim
    assert cfg.use_linear_projection and cfg.addition_embed_type == "text_time"
    # the deepest level still has at least 2x2 latent cells
    assert cfg.sample_size // 2 ** (len(cfg.block_out_channels) - 1) >= 2
    assert tiny_pipe.vae_scale_factor == 8
    assert cfg.sample_size * 8 == get_backbone("tiny").resolution
    sched = tiny_pipe.scheduler
    assert type(sched).__name__ == "EulerDiscreteScheduler"
    assert sched.config.timestep_spacing == "leading" and sched.config.steps_offset == 1
    assert sched.config.beta_schedule == "scaled_linear"


def test_tiny_build_is_deterministic_and_fast():
    build_tiny_components()  # warm caches (imports, BPE file)
    start = time.perf_counter()
    a = build_tiny_components()
    assert time.perf_counter() - start < 3
    b = build_tiny_components()
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = a[key].state_dict(), b[key].state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    # building does not disturb the caller's random stream
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_components()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_weights_are_the_same_in_another_process():
    code = (
        "import torch; from relationbench.backbones import build_tiny_components as b; "
        "torch.set_grad_enabled(False); u = b()['unet']; print(repr(float(sum(p.double().sum() for p in u.parameters()))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    with torch.no_grad():
        here = float(sum(p.double().sum() for p in build_tiny_components()["unet"].parameters()))
    assert float(out.stdout.strip().splitlines()[-1]) == here


def test_tokenizers_match_open_clip():
    import open_clip

    tok1, tok2 = build_clip_tokenizers()
    reference = open_clip.tokenize(PROMPTS + ["hello world!"]).tolist()
    for prompt, ref in zip(PROMPTS + ["hello world!"], reference):
        ids1 = tok1(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        n = ref.index(49407) + 1
        assert ids1[:n] == ref[:n] and set(ids1[n:]) <= {49407}  # pads with <|endoftext|>
    for prompt, ref in zip(PROMPTS, reference):
        # SDXL's tokenizer_2 pads with "!" (id 0), which is open_clip's padding too
        # (so, like SDXL's, it also splits a "!" in the text into the pad token)
        assert tok2(prompt, padding="max_length", max_length=77, truncation=True).input_ids == ref
    assert tok1.pad_token_id == 49407 and tok2.pad_token_id == 0 and len(tok1) == 49408


def test_tiny_pipeline_makes_an_image_and_is_cached(tiny_pipe):
    bb = get_backbone("tiny")
    pipe = bb.sdxl_pipeline()
    assert bb.sdxl_pipeline() is pipe
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a dog hugging a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.size == (bb.resolution, bb.resolution)
    again = tiny_pipe("a dog hugging a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(image), np.asarray(again.images[0]))


def test_local_diffusers_folder_loads(tiny_pipe, tmp_path, empty_hf_cache):
    folder = tmp_path / "my-sdxl"
    tiny_pipe.save_pretrained(folder)
    bb = get_backbone("sdxl", {"sdxl": str(folder)})
    assert bb.check_available() == {"sdxl": folder}
    pipe = bb.sdxl_pipeline()
    assert bb.sdxl_pipeline() is pipe
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=64, width=64, generator=None)
    image = pipe("a cat", **{**kwargs, "generator": torch.Generator().manual_seed(1)}).images[0]
    ref = tiny_pipe("a cat", **{**kwargs, "generator": torch.Generator().manual_seed(1)}).images[0]
    assert image.size == (64, 64)
    assert np.array_equal(np.asarray(image), np.asarray(ref))


def test_import_does_not_import_torch():
    code = "import sys, relationbench.backbones; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)



# --------------------------------------------------------------------------- the vae part


@pytest.fixture(scope="module")
def saved_sdxl(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "my-sdxl"
    tiny_pipe.save_pretrained(folder)
    return folder


def test_vae_override_replaces_sdxls_vae(tiny_pipe, saved_sdxl, tmp_path, empty_hf_cache):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(tiny_pipe.vae.config)
    vae.load_state_dict(tiny_pipe.vae.state_dict())
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # a brighter VAE
    vae.save_pretrained(tmp_path / "my-vae")
    bb = get_backbone("sdxl", {"sdxl": str(saved_sdxl), "vae": str(tmp_path / "my-vae")})
    assert bb.check_available() == {"sdxl": saved_sdxl, "vae": tmp_path / "my-vae"}
    info = bb.describe()
    assert info["weights"]["vae"] == {"kind": "local", "location": str(tmp_path / "my-vae")}
    assert info["overridden"] == ["sdxl", "vae"]
    pipe = bb.sdxl_pipeline()
    for name, value in vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    assert not torch.equal(pipe.vae.decoder.conv_out.bias, tiny_pipe.vae.decoder.conv_out.bias)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    ours = pipe("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    ref = tiny_pipe("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert ours.mean() > ref.mean() + 0.05  # the same latents, decoded by the brighter VAE


def test_vae_override_forms_and_refusals(tiny_pipe, saved_sdxl, tmp_path):
    from diffusers import AutoencoderKL

    assert "vae" not in get_backbone("sdxl").describe()["weights"]  # default: SDXL's own
    hub = get_backbone("sdxl", {"vae": "madebyollin/sdxl-vae-fp16-fix"})
    assert hub.weights["vae"] == WeightSource.hub("madebyollin/sdxl-vae-fp16-fix")
    with pytest.raises(UserError, match="no weights to override"):
        get_backbone("tiny", {"vae": str(tmp_path)})
    with pytest.raises(UserError, match="did you mean 'vae'") as err:
        get_backbone("sdxl", {"vaee": str(tmp_path)})  # ("vea" is as close to the metrics' "vqa")
    assert "keys: sdxl, " in str(err.value) and str(err.value).split("\n")[0].endswith(", vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="diffusers layout") as err:
        get_backbone("sdxl", {"sdxl": str(saved_sdxl), "vae": str(tmp_path / "empty")}).check_available()
    assert err.value.path == str(tmp_path / "empty")
    AutoencoderKL(**{**TINY.vae, "latent_channels": 8}).save_pretrained(tmp_path / "wide-vae")
    with pytest.raises(UserError, match="8 latent channels; SDXL's UNet needs 4"):
        get_backbone("sdxl", {"sdxl": str(saved_sdxl), "vae": str(tmp_path / "wide-vae")}).sdxl_pipeline()


@pytest.mark.parametrize("key", ["dino", "image_encoder", "detector", "vqa", "vae"])
def test_a_broken_local_folder_is_one_clear_error(key, tmp_path):
    """Every model loader turns a from_pretrained failure on a --weight folder into one
    UserError naming the folder (backbones.loading_from), never a traceback."""
    from relationbench.metrics.detector import load_detector
    from relationbench.metrics.models import load_dino_model
    from relationbench.metrics.vqa import load_vqa_scorer
    from relationbench.methods.msdiffusion.encoder import load_image_encoder

    folder = tmp_path / key
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    backbone = get_backbone("sdxl", {key: str(folder)})
    load = {"dino": load_dino_model, "image_encoder": load_image_encoder, "detector": load_detector,
            "vqa": load_vqa_scorer, "vae": lambda b: b._sdxl_parts(None)}[key]
    with pytest.raises(UserError, match="cannot load .* from this folder") as err:
        load(backbone)
    assert err.value.path == str(folder)
    assert f"--weight {key}=" in err.value.hint if key != "vae" else "AutoencoderKL" in err.value.hint
