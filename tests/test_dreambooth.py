"""DreamBooth LoRA baseline on the tiny backbone: the trainer path computes what the old loop
did, the prior-preservation batch, joint two-subject training, the diffusers file format, and
the LoRA bank the method trains into and switches from."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.methods.dreambooth import DreamBoothSettings, training
from relationbench.methods.dreambooth.training import (Concept, TrainSettings, dreambooth_loss, examples,
                                                       train_dreambooth)
from relationbench.methods.lora.bank import LoraBank
from relationbench.methods.lora.files import WEIGHT_NAME, read_loss_log
from relationbench.score import scoring_text
from relationbench.suites import load_suite

from .conftest import REPO
from .score_runs import make_references, photo

pytestmark = pytest.mark.usefixtures("one_thread")

def test_examples_interleave_concepts_and_pair_class_images(tmp_path):
    a = Concept("sks", "dog", (tmp_path / "d0", tmp_path / "d1", tmp_path / "d2"), (tmp_path / "c0",))
    b = Concept("zwx", "cat", (tmp_path / "k0",), (tmp_path / "q0", tmp_path / "q1"))
    instance, classes = examples([a, b])
    assert [e.prompt for e in instance] == ["a sks dog", "a zwx cat"] * 3
    assert [e.image.name for e in instance] == ["d0", "k0", "d1", "k0", "d2", "k0"]
    assert [e.prompt for e in classes] == ["a dog", "a cat"] * 2 and [e.image.name for e in classes] == ["c0", "q0",
                                                                                                       "c0", "q1"]


def test_loss_is_instance_plus_weighted_prior():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    inst = ((pred[0] - target[0]) ** 2).mean()
    prior = ((pred[1] - target[1]) ** 2).mean()
    assert dreambooth_loss(pred, target, 1, 0.5).item() == pytest.approx((inst + 0.5 * prior).item(), rel=1e-6)
    w = torch.tensor([2.0, 3.0])
    assert dreambooth_loss(pred, target, 1, 1.0, w).item() == pytest.approx((2 * inst + 3 * prior).item(), rel=1e-6)
    assert dreambooth_loss(pred[:1], target[:1], 1, 1.0).item() == pytest.approx(inst.item(), rel=1e-6)


@pytest.fixture
def pipe():
    return get_backbone("tiny").sdxl_pipeline()


def _images(tmp_path, name, n, seed):
    paths = []
    for i in range(n):
        path = tmp_path / f"{name}{i}.png"
        photo(seed + i, 80).save(path)
        paths.append(path)
    return tuple(paths)


def old_loop(pipe, concepts, resolution: int, steps: int, accum: int, prior_weight: float, snr_gamma: float,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """DreamBooth's training loop as it was before the generic trainer (batch 1, AdamW lr 1e-4,
    weight decay 1e-4, clip-norm 1.0, one generator drawing instance row, class row, latents,
    noise, timesteps in that order), in plain torch; the LoRA init seeded from `seed` as the
    trainer seeds it. Returns the LoRA in diffusers naming with the unet. prefix."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    unet, vae = pipe.unet, pipe.vae
    gen = torch.Generator().manual_seed(seed)
    instance, classes = examples(concepts)
    with torch.no_grad():
        dists, sizes = {}, {}
        for ex in {e.image: e for e in instance + classes}.values():
            x, sizes[ex.image] = training._pixels(ex.image, resolution)
            dists[ex.image] = vae.encode(x[None]).latent_dist
        prompts = sorted({e.prompt for e in instance + classes})
        embeds = dict(zip(prompts, zip(*training._encode_prompts(pipe, prompts, "cpu"))))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                            target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        inject_adapter_in_model(config, unet, adapter_name="old")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    for _ in range(steps):
        for _ in range(accum):
            rows = [instance[int(torch.randint(len(instance), (1,), generator=gen))],
                    classes[int(torch.randint(len(classes), (1,), generator=gen))]]
            latents = torch.cat([dists[e.image].sample(generator=gen) for e in rows]) * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=gen)
            hidden = torch.stack([embeds[e.prompt][0] for e in rows])
            pooled = torch.stack([embeds[e.prompt][1] for e in rows])
            time_ids = torch.tensor([[*sizes[e.image], 0, 0, resolution, resolution] for e in rows])
            pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            snr = compute_snr(sched, t)
            per_row = ((pred - noise) ** 2).flatten(1).mean(1) * torch.clamp(snr, max=snr_gamma) / snr
            ((per_row[0] + prior_weight * per_row[1]) / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    state = {f"unet.{k}": v.detach().clone() for k, v in
             convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="old")).items()}
    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, module.get_base_layer())
    del unet.peft_config
    return state


def test_trainer_path_computes_what_the_old_loop_did(tmp_path, pipe, monkeypatch):
    """Same LoRA weights as the old loop; each micro-batch holds the instance rows then the class
    rows; a pair trains one LoRA on both subjects' prompts; the pipeline is left as it was."""
    seen, prompts = [], []
    real_loss, real_encode = training.dreambooth_loss, training._encode_prompts
    monkeypatch.setattr(training, "dreambooth_loss", lambda pred, target, n, w, weights=None:
                        seen.append((pred.shape[0], n, w)) or real_loss(pred, target, n, w, weights))
    monkeypatch.setattr(training, "_encode_prompts", lambda p, texts, device:
                        prompts.extend(texts) or real_encode(p, texts, device))
    concepts = [Concept("sks", "dog", _images(tmp_path, "dog", 2, 0), _images(tmp_path, "cdog", 2, 10)),
                Concept("zwx", "cat", _images(tmp_path, "cat", 1, 20), _images(tmp_path, "ccat", 1, 30))]
    x = torch.randn(1, 4, 8, 8)
    cond = dict(encoder_hidden_states=torch.randn(1, 77, 96),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)})
    with torch.no_grad():
        before = pipe.unet(x, 10, **cond).sample
    out = train_dreambooth(pipe, concepts, TrainSettings(train_steps=2, gradient_accumulation=2, prior_loss_weight=0.7,
                                                         snr_gamma=5.0), tmp_path / "lora", 64, "cpu", progress=False)
    assert seen == [(2, 1, 0.7)] * 4  # 2 steps x 2 accumulation; 1 instance + 1 class row each
    assert sorted(set(prompts)) == ["a cat", "a dog", "a sks dog", "a zwx cat"]
    assert [r["step"] for r in read_loss_log(out)] == [1, 2]
    state = load_file(out / WEIGHT_NAME)
    assert state and all(k.startswith("unet.") for k in state)
    modules = {k.rsplit(".lora", 1)[0] for k in state}
    attention = [n for n, m in pipe.unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert len(modules) == 4 * len(attention)  # to_q, to_k, to_v, to_out.0 of every attention layer
    assert not any("lora" in k for k in pipe.unet.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10, **cond).sample, before)
    monkeypatch.undo()
    old = old_loop(pipe, concepts, 64, steps=2, accum=2, prior_weight=0.7, snr_gamma=5.0)
    assert old.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(state[k], old[k], rtol=1e-6, atol=1e-8)
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("up.weight"))  # it trained


def test_text_encoder_lora_no_prior_checkpointing_bf16(tmp_path, pipe, monkeypatch):
    seen = []
    real_loss = training.dreambooth_loss
    monkeypatch.setattr(training, "dreambooth_loss", lambda pred, target, n, w, weights=None:
                        seen.append(pred.shape[0]) or real_loss(pred, target, n, w, weights))
    concept = Concept("sks", "dog", _images(tmp_path, "dog", 1, 0), _images(tmp_path, "cdog", 1, 10))
    out = train_dreambooth(pipe, [concept], TrainSettings(train_steps=1, gradient_accumulation=1,
                                                          prior_preservation=False, train_text_encoder=True,
                                                          gradient_checkpointing=True, mixed_precision="bf16"),
                           tmp_path / "lora", 64, "cpu", progress=False)
    assert seen == [1]  # no class rows
    prefixes = {k.split(".")[0] for k in load_file(out / WEIGHT_NAME)}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert not any("lora" in k for k in pipe.text_encoder.state_dict())
    assert not pipe.unet.is_gradient_checkpointing


# -- the method: train once into the bank, switch, reuse -----------------------------------------------------
CASES = "rb-s-001,rb-m-011"
FAST = dict(train_steps=2, gradient_accumulation=2, num_class_images=2, class_steps=2, steps=2, resolution=64,
            height=64, width=64)


def _card(tmp_path, name="db-fast", **extra):
    card = tmp_path / f"{name}.yaml"
    card.write_text(f"name: {name}\nadapter: relationbench.methods.dreambooth:DreamBoothMethod\n"
                    f"settings: {json.dumps({**FAST, **extra})}\n")
    return card


def _generate(card, out):
    res = CliRunner().invoke(cli, ["generate", "--method", str(card), "--backbone", "tiny", "--quiet", "--cases", CASES,
                                   "--batch-size", "2", "--out", str(out)])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_generate_trains_each_lora_once_into_the_bank_and_reuses_it(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from relationbench.methods import Context, Request
    from relationbench.methods.dreambooth import DreamBoothMethod
    from relationbench.methods.dreambooth import method as db

    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    make_references(tmp_path / "data", CASES.split(","))
    trained, loads = [], []
    real_train, real_load = db.train_dreambooth, StableDiffusionXLPipeline.load_lora_weights
    monkeypatch.setattr(db, "train_dreambooth", lambda *a, **k: trained.append([c.identifier for c in a[1]])
                        or real_train(*a, **k))
    monkeypatch.setattr(StableDiffusionXLPipeline, "load_lora_weights", lambda self, *a, **k: loads.append(
        k["adapter_name"]) or real_load(self, *a, **k))
    first = _generate(_card(tmp_path), tmp_path / "run1")
    assert sorted(trained) == [["sks"], ["sks", "zwx"]]  # one LoRA per subject set; the pair jointly
    assert sorted(loads) == sorted({r["lora"] for r in first})  # each loaded once in the run
    bank = LoraBank(tmp_path / "cache" / "dreambooth" / "loras")
    entries = {e.name: e for e in bank.entries()}
    assert entries.keys() == {r["lora"] for r in first}
    suite = load_suite("relationbench")
    assert all(e.base == get_backbone("tiny").describe() and e.steps == 2 for e in entries.values())
    for r in first:
        case = suite.case(r["case_id"])
        assert entries[r["lora"]].info["subjects"] == sorted(s.name for s in case.subjects)  # its own subjects' LoRA
        assert r["prompt"] == case.personalized_prompt(r["identifiers"]) and "sks" in r["prompt"]
        assert scoring_text(case, r) == case.prompt  # the scorer sees the prompt without identifiers

    second = _generate(_card(tmp_path), tmp_path / "run2")
    assert len(trained) == 2  # nothing retrained
    assert [r["lora"] for r in first] == [r["lora"] for r in second]
    for r in second:
        assert (tmp_path / "run1" / r["path"]).read_bytes() == (tmp_path / "run2" / r["path"]).read_bytes()
    prefixed = _generate(_card(tmp_path, "db-prefix", prompt_prefix="a photo: "), tmp_path / "run3")
    assert len(trained) == 2  # a sampling setting: the same LoRAs
    for r in prefixed:
        assert r["prompt"].startswith("a photo: ") and scoring_text(suite.case(r["case_id"]), r) == \
            suite.case(r["case_id"]).prompt
    _generate(_card(tmp_path, "db-lr", learning_rate=2e-4), tmp_path / "run4")
    assert len(trained) == 4  # another training setting, other LoRAs
    assert len(bank.entries()) == 4 and not list(bank.root.glob(".*"))

    # the method itself: one load per LoRA, a switch per group, close() takes the adapters off
    ctx = Context(backbone=get_backbone("tiny"), device="cpu", dtype=torch.float32, data_root=tmp_path / "data")
    method = DreamBoothMethod(DreamBoothSettings(**FAST), ctx)
    method.load()
    cases = [suite.case(c) for c in CASES.split(",")]
    method.prepare(cases)
    assert len(trained) == 4
    loads.clear()
    groups = [method.group(c) for c in cases]
    assert len(set(groups)) == 2 and groups == [method.group(c) for c in cases]
    for case in cases + cases:
        (sample,) = method.generate([Request(case, 0, 1)])
        assert sample.meta["lora"] == method.group(case) == method.adapters.active
    assert sorted(loads) == sorted(groups)
    with pytest.raises(ValueError, match="one LoRA"):
        method.generate([Request(c, 0, 1) for c in cases])
    method.close()
    assert not method.pipe.get_list_adapters()
    assert not any("lora" in k for k in method.pipe.unet.state_dict())


def test_lora_key_holds_what_changes_the_lora_and_nothing_else(tmp_path):
    """A case's LoRA (its group and bank key) changes with every setting that changes what the
    LoRA learns, and with no other: sampling settings and the checkpoint interval reuse it."""
    from relationbench.methods import Context
    from relationbench.methods.dreambooth import DreamBoothMethod

    make_references(tmp_path / "data", CASES.split(","))
    case = load_suite("relationbench").case("rb-m-011")
    ctx = Context(backbone=get_backbone("tiny"), device="cpu", dtype=torch.float32, data_root=tmp_path / "data")

    def key(**changes) -> str:
        return DreamBoothMethod(DreamBoothSettings(**{**FAST, **changes}), ctx).group(case)

    base = key()
    same = dict(steps=3, guidance_scale=7.0, negative_prompt="blurry", prompt_prefix="a photo: ", height=128, width=128,
                cache_dir=str(tmp_path / "elsewhere"), checkpoint_every=1)
    for name, value in same.items():
        assert key(**{name: value}) == base, name
    other = dict(learning_rate=2e-4, rank=8, alpha=8, seed=1, train_steps=3, gradient_accumulation=3, batch_size=2,
                 resolution=128, identifiers=("zwx", "sks"), mixed_precision="bf16", prior_loss_weight=0.5,
                 snr_gamma=5.0, train_text_encoder=True, optimizer="adam", max_grad_norm=None,
                 num_class_images=3, class_steps=3, class_guidance_scale=7.0)  # the last three: the class images
    keys = {name: key(**{name: value}) for name, value in other.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys)
    # without prior preservation the class images (and what they are sampled with) play no part
    plain = key(prior_preservation=False)
    assert plain != base
    for name in ("num_class_images", "class_steps", "class_guidance_scale"):
        assert key(prior_preservation=False, **{name: other[name]}) == plain, name
    with_image = tmp_path / "data" / case.subjects[0].source / case.subjects[0].dir / "00.jpg"
    with_image.write_bytes(with_image.read_bytes() + b"\0")  # the reference images' bytes
    assert key() != base


def test_card_tiny_schedule_is_seconds():
    """The card's smoke schedule names DreamBooth settings and trains in a few steps."""
    card = yaml.safe_load((REPO / "methods" / "dreambooth.yaml").read_text())
    assert set(card["tiny"]) <= set(DreamBoothSettings.__dataclass_fields__) and card["version"] == 2
    assert set(card["settings"]) == set(DreamBoothSettings.__dataclass_fields__)
    tiny = card["tiny"]
    assert tiny["train_steps"] * tiny["gradient_accumulation"] <= 2 and tiny["num_class_images"] <= 2
