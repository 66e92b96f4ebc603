"""DreamBooth LoRA baseline on the tiny backbone: the prior-preservation batch, joint
two-subject training, the diffusers file format, and the LoRA cache."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.methods.dreambooth import training
from relationbench.methods.dreambooth.training import (WEIGHT_NAME, Concept, TrainSettings, dreambooth_loss,
                                                       examples, train_lora)
from relationbench.score import scoring_text
from relationbench.suites import load_suite

from .score_runs import make_references, photo

TINY_TRAIN = dict(train_steps=2, gradient_accumulation=2)


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


def test_prior_preservation_batch_and_joint_training(tmp_path, pipe, monkeypatch):
    """Each micro-batch holds the instance rows then the class rows; a pair trains one LoRA on
    both subjects' prompts; the pipeline is left exactly as it was."""
    seen, prompts = [], []
    real_loss, real_encode = training.dreambooth_loss, training._encode_prompts
    monkeypatch.setattr(training, "dreambooth_loss", lambda pred, target, n, w, weights=None:
                        seen.append((pred.shape[0], n, w)) or real_loss(pred, target, n, w, weights))
    monkeypatch.setattr(training, "_encode_prompts", lambda p, texts, device:
                        prompts.extend(texts) or real_encode(p, texts, device))
    concepts = [Concept("sks", "dog", _images(tmp_path, "dog", 2, 0), _images(tmp_path, "cdog", 2, 10)),
                Concept("zwx", "cat", _images(tmp_path, "cat", 1, 20), _images(tmp_path, "ccat", 1, 30))]
    x = torch.randn(1, 4, 16, 16)
    cond = dict(encoder_hidden_states=torch.randn(1, 77, 96),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)})
    with torch.no_grad():
        before = pipe.unet(x, 10, **cond).sample
    path = train_lora(pipe, concepts, TrainSettings(**TINY_TRAIN, prior_loss_weight=0.7, snr_gamma=5.0),
                      tmp_path / "lora", 128, "cpu", progress=False)
    assert seen == [(2, 1, 0.7)] * 4  # 2 steps x 2 accumulation; 1 instance + 1 class row each
    assert sorted(set(prompts)) == ["a cat", "a dog", "a sks dog", "a zwx cat"]
    state = load_file(path)
    assert path.name == WEIGHT_NAME and state and all(k.startswith("unet.") for k in state)
    modules = {k.rsplit(".lora", 1)[0] for k in state}
    attention = [n for n, m in pipe.unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert len(modules) == 4 * len(attention)  # to_q, to_k, to_v, to_out.0 of every attention layer
    assert any(".attn1.to_q" in k for k in state) and any(".attn2.to_out.0" in k for k in state)
    assert not any("lora" in k for k in pipe.unet.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10, **cond).sample, before)
    # the diffusers loader reads the file
    pipe.load_lora_weights(str(path.parent), weight_name=WEIGHT_NAME, adapter_name="check")
    pipe.delete_adapters("check")


def test_text_encoder_lora_no_prior_checkpointing_bf16(tmp_path, pipe, monkeypatch):
    seen = []
    real_loss = training.dreambooth_loss
    monkeypatch.setattr(training, "dreambooth_loss", lambda pred, target, n, w, weights=None:
                        seen.append(pred.shape[0]) or real_loss(pred, target, n, w, weights))
    concept = Concept("sks", "dog", _images(tmp_path, "dog", 1, 0), _images(tmp_path, "cdog", 1, 10))
    path = train_lora(pipe, [concept], TrainSettings(train_steps=1, gradient_accumulation=1, prior_preservation=False,
                                                      train_text_encoder=True, gradient_checkpointing=True,
                                                      mixed_precision="bf16"), tmp_path / "lora", 128, "cpu",
                      progress=False)
    assert seen == [1]  # no class rows
    prefixes = {k.split(".")[0] for k in load_file(path)}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert not any("lora" in k for k in pipe.text_encoder.state_dict())


# -- the method: train once, reuse ---------------------------------------------------------------------------
CASES = "rb-s-001,rb-m-011"


def _card(tmp_path, name="db-fast", **extra):
    settings = dict(TINY_TRAIN, num_class_images=2, class_steps=2, sample_steps=2, **extra)
    card = tmp_path / f"{name}.yaml"
    card.write_text(f"name: {name}\nadapter: relationbench.methods.dreambooth:DreamBoothMethod\n"
                    f"settings: {json.dumps(settings)}\n")
    return card


def _generate(card, out):
    res = CliRunner().invoke(cli, ["generate", "--method", str(card), "--backbone", "tiny", "--quiet", "--cases", CASES,
                                   "--batch-size", "2", "--out", str(out)])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_generate_trains_each_lora_once_and_reuses_it(tmp_path, monkeypatch):
    from relationbench.methods.dreambooth import method as db

    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    make_references(tmp_path / "data", CASES.split(","))
    trained = []
    real = db.train_lora
    monkeypatch.setattr(db, "train_lora", lambda *a, **k: trained.append([c.identifier for c in a[1]]) or real(*a, **k))
    first = _generate(_card(tmp_path), tmp_path / "run1")
    assert sorted(trained) == [["sks"], ["sks", "zwx"]]  # one LoRA per subject set; the pair jointly
    suite = load_suite("relationbench")
    for r in first:
        case = suite.case(r["case_id"])
        assert r["prompt"] == case.personalized_prompt(r["identifiers"]) and "sks" in r["prompt"]
        assert scoring_text(case, r) == case.prompt  # the scorer sees the prompt without identifiers
    second = _generate(_card(tmp_path), tmp_path / "run2")
    assert len(trained) == 2  # nothing retrained
    assert [r["lora"] for r in first] == [r["lora"] for r in second]
    for r in second:
        assert (tmp_path / "run1" / r["path"]).read_bytes() == (tmp_path / "run2" / r["path"]).read_bytes()
    _generate(_card(tmp_path, "db-lr", learning_rate=2e-4), tmp_path / "run3")
    assert len(trained) == 4  # another setting, other LoRAs
    cached = list((tmp_path / "cache" / "dreambooth" / "loras").glob("*/" + WEIGHT_NAME))
    assert len(cached) == 4 and not list((tmp_path / "cache" / "dreambooth" / "loras").glob(".*tmp"))
