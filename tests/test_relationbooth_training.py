"""RelationBooth training on the tiny backbone, below the command: the paper's settings as
defaults and the authors' as a card, the fixed inputs and batches, the loss against a plain
recomputation (row by row: padding one- and two-object samples changes nothing), the KML's
weight entering exactly once, the conditioning reaching the UNet, and the predicate attention
loss against a hand computation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from relationbench.backbones import get_backbone
from relationbench.data.example_triplets import write_example_triplets
from relationbench.data.triplets import ObjectAnnotation
from relationbench.errors import UserError
from relationbench.methods import Context, default_registry
from relationbench.methods.lora.trainer import TrainerSettings
from relationbench.methods.relationbooth import RelationBoothMethod, RelationBoothSettings
from relationbench.methods.relationbooth.kml import KMLSettings, image_pixels, sample_at_keypoints
from relationbench.methods.relationbooth.training import (PredicateAttention, RelationBatches, RelationBoothLoss,
                                                          encode_samples, object_region, training_scheduler)

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 64  # training side in these tests: an 8x8 latent


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    return write_example_triplets(tmp_path_factory.mktemp("triplets") / "set")


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    ctx = Context(backbone=get_backbone("tiny"), device="cpu", dtype=torch.float32,
                  data_root=tmp_path_factory.mktemp("data"), quiet=True)
    m = RelationBoothMethod(RelationBoothSettings(resolution=RES), ctx)
    m.load()
    yield m
    m.close()


@pytest.fixture(scope="module")
def mixed(method, triplets):
    """Two hug samples (two objects each) and two wave samples (one object), encoded."""
    samples = triplets.relations["hug"][:2] + triplets.relations["wave"][:2]
    return samples, encode_samples(method, samples, RES, progress=False)


def test_defaults_are_the_papers_and_the_authors_card_has_their_code(method):
    s = RelationBoothSettings()
    t = TrainerSettings.of(s)
    assert (t.rank, t.lora_alpha, t.init, t.optimizer, t.learning_rate, t.weight_decay, t.max_grad_norm,
            t.train_steps, t.gradient_accumulation, t.mixed_precision) == (4, 4, "gaussian", "adam", 1e-4, 0.0, None,
                                                                           500, 1, "no")
    assert (s.batch_size, s.scale, s.kml_weight, s.kml_max_timestep, s.predicate_loss_weight, s.guidance_scale,
            s.steps) == (8, 0.6, 1e-3, None, 0.0, 5.0, 30)
    card = default_registry().card("relationbooth")
    assert card.resolve().values == dataclasses.asdict(s)  # the card spells out the defaults
    authors = default_registry().card("relationbooth-authors").resolve().values
    assert {k: authors[k] for k in ("optimizer", "weight_decay", "batch_size", "gradient_accumulation",
                                    "mixed_precision", "max_grad_norm", "kml_weight", "kml_max_timestep",
                                    "predicate_loss_weight")} == dict(
        optimizer="adamw", weight_decay=1e-4, batch_size=1, gradient_accumulation=4, mixed_precision="fp16",
        max_grad_norm=1.0, kml_weight=0.1, kml_max_timestep=333, predicate_loss_weight=1e-3)
    with pytest.raises(UserError, match="batch_size"):
        default_registry().card("relationbooth", {"batch_size": 0}).resolve()
    # the LoRA key follows what it learns, not the sampling settings or the checkpoint interval
    name = method.lora_name("hug", "data")
    for change, same in ((dict(steps=5, guidance_scale=2.0, checkpoint_every=3), True),
                         (dict(learning_rate=2e-4), False), (dict(kml_weight=0.1), False), (dict(scale=0.4), False)):
        other = RelationBoothMethod(dataclasses.replace(method.settings, **change), method.context)
        assert (other.lora_name("hug", "data") == name) is same, change
    assert method.lora_name("hug", "other data") != name


def test_inputs_and_batches(method, mixed):
    samples, inputs = mixed
    pipe = method.pipe
    hug, wave = inputs[0], inputs[2]
    assert hug.tokens.shape == (2, 16, pipe.unet.config.cross_attention_dim) and wave.tokens.shape[0] == 1
    assert torch.equal(hug.boxes, torch.tensor([o.box for o in samples[0].objects], dtype=torch.float32))
    assert hug.scales.tolist() == pytest.approx([0.6, 0.6])
    assert hug.time_ids.tolist() == [128, 128, 0, 0, RES, RES]  # the example images are 128 px
    embeds, _, pooled, _ = pipe.encode_prompt(samples[0].prompt, device="cpu", do_classifier_free_guidance=False)
    # encoded with the other prompts: one row alone rounds differently on the CPU
    assert torch.allclose(hug.prompt_embeds, embeds[0], atol=1e-6) and torch.allclose(hug.pooled, pooled[0], atol=1e-6)
    with torch.no_grad():
        ref = pipe.vae.encode(image_pixels(samples[0].references[1].image, RES)[None]).latent_dist.mean
    assert torch.allclose(hug.ref_latents[1], ref[0] * pipe.vae.config.scaling_factor)
    assert torch.equal(hug.ref_xy[1], torch.tensor(samples[0].references[1].keypoints.xy))
    assert hug.score.eq(1).all()  # hug has no scores: all kept

    draw = RelationBatches(inputs, 3, pipe.vae.config.scaling_factor, 1000, torch.float32)
    a, b = draw(torch.Generator().manual_seed(5)), draw(torch.Generator().manual_seed(5))
    assert [r.id for r in a.samples] == [r.id for r in b.samples] and torch.equal(a.latents, b.latents)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)
    assert a.latents.shape == (3, 4, RES // 8, RES // 8) and 0 <= a.timesteps.min() and a.timesteps.max() < 1000


def _count_local(monkeypatch, calls: dict) -> None:
    """calls["local"]: calls of the local encoder (LocalEncoder.tokens), which never runs the
    tower's forward (dense_features calls its layers), so the CLIP hook does not count it."""
    from relationbench.methods.relationbooth.local_tokens import LocalEncoder

    tokens = LocalEncoder.tokens

    def counting(self, *args, **kw):
        calls["local"] += 1
        return tokens(self, *args, **kw)

    monkeypatch.setattr(LocalEncoder, "tokens", counting)


def test_fixed_inputs_are_encoded_once(method, triplets, monkeypatch):
    """One text-encoder call for every distinct prompt, one CLIP call for every reference, one
    VAE call per target and per distinct reference content (a sample repeating another's
    references under another id encodes only its target)."""
    hug = triplets.relations["hug"]
    again = dataclasses.replace(hug[0], id="again")
    pipe = method.pipe
    method._embeds.clear()  # the fixture's references were encoded already
    method._features.clear()
    calls = {"vae": 0, "clip": 0, "local": 0, "prompts": []}
    vae_encode, encode_prompt = pipe.vae.encode, pipe.encode_prompt
    _count_local(monkeypatch, calls)

    def count_vae(x):
        calls["vae"] += 1
        return vae_encode(x)

    def count_prompt(prompts, **kw):
        calls["prompts"].append(list(prompts))
        return encode_prompt(prompts, **kw)

    monkeypatch.setattr(pipe.vae, "encode", count_vae)
    monkeypatch.setattr(pipe, "encode_prompt", count_prompt)
    handle = method._encoder.register_forward_hook(lambda *_: calls.__setitem__("clip", calls["clip"] + 1))
    try:
        inputs = encode_samples(method, [hug[0], hug[1], again], RES, progress=False)
    finally:
        handle.remove()
    assert calls["prompts"] == [list(dict.fromkeys([hug[0].prompt, hug[1].prompt]))]
    assert calls["clip"] == 1  # the 4 references in one chunk, not again per sample
    assert calls["local"] == 1  # and their local tokens (the 896 px pass on sdxl) likewise
    assert calls["vae"] == 3 + 4  # 3 targets, 4 distinct references
    assert torch.equal(inputs[2].ref_latents, inputs[0].ref_latents) and torch.equal(inputs[2].tokens, inputs[0].tokens)


@pytest.mark.parametrize("change, vae, clip", [(dict(kml_weight=0.0), 2, 1),  # targets only; the references
                                               (dict(relation_data=False), 2, 1)])  # the blank prompt only
def test_what_the_settings_do_not_train_with_is_not_encoded(method, triplets, monkeypatch, change, vae, clip):
    """Without the KML no reference goes through the VAE; without relation-aware data no
    reference goes through the image encoder (the blank prompt does, once)."""
    other = RelationBoothMethod(dataclasses.replace(method.settings, **change), method.context)
    other.load()  # the backbone's cached pipeline: processors put back by close()
    calls = {"vae": 0, "clip": 0, "local": 0}
    _count_local(monkeypatch, calls)
    try:
        vae_encode = other.pipe.vae.encode

        def count_vae(x):
            calls["vae"] += 1
            return vae_encode(x)

        monkeypatch.setattr(other.pipe.vae, "encode", count_vae)
        handle = other._encoder.register_forward_hook(lambda *_: calls.__setitem__("clip", calls["clip"] + 1))
        try:
            inputs = encode_samples(other, triplets.relations["hug"][:2], RES, progress=False)
        finally:
            handle.remove()
    finally:
        other.close()
    assert calls == {"vae": vae, "clip": clip, "local": clip}
    assert all(r.ref_latents is None for r in inputs) and inputs[0].tokens.shape[0] == 2


def _batch(inputs, seed=3):
    gen = torch.Generator().manual_seed(seed)
    batch = RelationBatches(inputs, 4, 0.13025, 1000, torch.float32)(gen)
    assert {r.objects for r in batch.samples} == {1, 2}, "the test wants a batch mixing one and two objects"
    return batch


def _loss(method, kml: KMLSettings, **kw) -> RelationBoothLoss:
    return RelationBoothLoss(method.adapter, training_scheduler(method.pipe), kml, (RES // 8, RES // 8), **kw)


def test_loss_equals_a_plain_recomputation(method, mixed):
    """Denoise MSE + lambda * KML, recomputed one row at a time from the raw samples: noising
    by hand, MS-Diffusion conditioning from the boxes and the scale, reference latents from the
    VAE, keypoint features from sample_at_keypoints, means over valid keypoints then rows."""
    samples, inputs = mixed
    pipe, unet = method.pipe, method.pipe.unet
    batch = _batch(inputs)
    raw = {(s.id, len(s.objects)): s for s in samples}  # hug and wave share ids; not object counts
    kml = KMLSettings(weight=1e-3)
    with torch.no_grad():
        parts = _loss(method, kml).parts(unet, batch)
        abar = training_scheduler(pipe).alphas_cumprod
        sf = pipe.vae.config.scaling_factor
        errors, per_row = [], []
        for i, row in enumerate(batch.samples):
            s = raw[row.id, row.objects]
            a = abar[batch.timesteps[i]]
            z_t = a.sqrt() * batch.latents[i : i + 1] + (1 - a).sqrt() * batch.noise[i : i + 1]
            embeds, _, pooled, _ = pipe.encode_prompt(s.prompt, device="cpu", do_classifier_free_guidance=False)
            boxes = torch.tensor([o.box for o in s.objects], dtype=torch.float32)
            tokens = method.reference_tokens([r.image for r in s.references], s.entities, boxes)
            scales = [torch.full((len(boxes),), 0.6)]
            ms = method.adapter.conditioning([tokens], [boxes], scales, (RES // 8,) * 2, False)
            time_ids = torch.tensor([[128.0, 128, 0, 0, RES, RES]])
            eps = unet(z_t, batch.timesteps[i : i + 1], encoder_hidden_states=embeds,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                       cross_attention_kwargs={"ms": ms}).sample
            errors.append((eps - batch.noise[i : i + 1]).pow(2).mean())
            z0 = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
            total, count = 0.0, 0
            for o, r in zip(s.objects, s.references):
                ref = pipe.vae.encode(image_pixels(r.image, RES)[None]).latent_dist.mean * sf
                pred = sample_at_keypoints(z0, torch.tensor(o.keypoints.xy)[None])[0]  # [17, C]
                want = sample_at_keypoints(ref, torch.tensor(r.keypoints.xy)[None])[0]
                total += (pred - want).pow(2).mean(-1).sum().item()
                count += 17
            per_row.append(total / count)
    denoise = torch.stack(errors).mean().item()
    keypoint = sum(per_row) / len(per_row)
    assert parts.denoise.item() == pytest.approx(denoise, rel=1e-4)
    assert parts.kml.item() == pytest.approx(keypoint, rel=1e-4)
    assert parts.total.item() == pytest.approx(denoise + 1e-3 * keypoint, rel=1e-4)
    assert parts.predicate.item() == 0


def test_kml_weight_enters_once_and_only_where_the_timestep_rule_allows(method, mixed):
    _, inputs = mixed
    unet, batch = method.pipe.unet, _batch(inputs)
    with torch.no_grad():
        off = _loss(method, KMLSettings(enabled=False, weight=0.0)).parts(unet, batch)
        on = _loss(method, KMLSettings(weight=1e-3)).parts(unet, batch)
        assert off.total.item() == off.denoise.item() and off.kml.item() == 0
        assert on.denoise.item() == off.denoise.item()  # the same batch, the same UNet call
        assert torch.equal(on.total, off.denoise + 1e-3 * on.kml)
        assert on.kml.item() > 0
        # the authors' rule per sample: only rows with t <= max_timestep count (as zero otherwise)
        t = sorted(batch.timesteps.tolist())
        cut = _loss(method, KMLSettings(weight=1e-3, max_timestep=t[1])).parts(unet, batch)
        none = _loss(method, KMLSettings(weight=1e-3, max_timestep=t[0] - 1)).parts(unet, batch)
    assert none.kml.item() == 0 and 0 < cut.kml.item() < on.kml.item()


def test_the_conditioning_reaches_the_unet(method, triplets, mixed):
    """Another reference image for the same sample, batch and seed changes the denoising loss
    (the KML, which reads the reference too, is off); a replaced processor is refused."""
    samples, inputs = mixed
    hug = triplets.relations["hug"][0]
    wave_ref = triplets.relations["wave"][0].references[0]
    swapped = dataclasses.replace(hug, references=(dataclasses.replace(hug.references[0], image=wave_ref.image),
                                                   hug.references[1]))
    other = encode_samples(method, [swapped], RES, progress=False)
    unet = method.pipe.unet
    loss = _loss(method, KMLSettings(enabled=False, weight=0.0))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        a = loss.parts(unet, RelationBatches(inputs[:1], 2, 0.13025, 1000, torch.float32)(gen())).denoise
        b = loss.parts(unet, RelationBatches(other, 2, 0.13025, 1000, torch.float32)(gen())).denoise
    assert not torch.equal(other[0].tokens, inputs[0].tokens) and a.item() != b.item()

    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        with pytest.raises(UserError, match="not in place"):
            _loss(method, KMLSettings()).parts(unet, RelationBatches(inputs, 1, 0.13025, 1000, torch.float32)(gen()))
    finally:
        unet.set_attn_processor(processors)


def test_object_region_is_the_covered_share_of_each_cell():
    box = ObjectAnnotation("a", (0.0, 0.0, 0.5, 0.25), None, None)  # the left half of the top quarter
    other = ObjectAnnotation("b", (0.75, 0.75, 1.0, 1.0), None, None)
    region = object_region([box, other], (8, 8), (2, 2)).view(2, 2)
    assert region.tolist() == [[0.5, 0.0], [0.0, 0.25]]


def test_predicate_attention_loss_against_a_hand_computation():
    """The share of the predicate tokens' text attention off the objects, on one attn2: 0 when
    every cell is an object's, 1 when none is, and the loop value in between."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    hidden, context = torch.randn(2, 4, 8), torch.randn(2, 5, 6)
    predicate = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.float32)
    half = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 1.0]])

    def hooked(region):
        capture = PredicateAttention([attn])
        handle = attn.register_forward_hook(capture._hook, with_kwargs=True)
        try:
            capture.start(predicate, region)
            attn(hidden, encoder_hidden_states=context)
            return capture.loss().item()
        finally:
            handle.remove()

    with torch.no_grad():
        q, k = attn.to_q(hidden), attn.to_k(context)
        expected = []
        for b in range(2):
            share = torch.zeros(4)
            for h in range(2):
                qh, kh = q[b, :, h * 4 : (h + 1) * 4], k[b, :, h * 4 : (h + 1) * 4]
                probs = torch.softmax(qh @ kh.T / 2.0, dim=-1)  # dim_head 4: scale 1/2
                share += probs[:, predicate[b].bool()].sum(-1) / 2
            expected.append(((share * (1 - half[b])).sum() / share.sum()).item())
        assert hooked(torch.ones(2, 4)) == pytest.approx(0.0, abs=1e-7)
        assert hooked(torch.zeros(2, 4)) == pytest.approx(1.0)
        assert hooked(half) == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_predicate_loss_enters_with_its_weight(method, mixed):
    samples, _ = mixed
    inputs = encode_samples(method, samples, RES, predicate=True, progress=False)
    assert inputs[0].predicate.sum() == 1  # "hugging" is one token
    unet, batch = method.pipe.unet, _batch(inputs)
    with torch.no_grad(), PredicateAttention.attached(unet, method.adapter) as capture:
        level2 = [n for n, _ in unet.named_modules() if n.endswith("attn2")
                  and n.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0."))]  # latent / 4
        assert [unet.get_submodule(n) for n in level2] == capture.modules and len(level2) == 8
        parts = _loss(method, KMLSettings(weight=1e-3), predicate_weight=0.5, predicate=capture).parts(unet, batch)
    assert 0 < parts.predicate.item() < 1
    assert parts.total.item() == pytest.approx(parts.denoise.item() + 1e-3 * parts.kml.item()
                                               + 0.5 * parts.predicate.item(), rel=1e-6)
    assert not any(m._forward_hooks for m in capture.modules)  # removed on leaving


def test_training_with_the_predicate_loss_under_gradient_checkpointing(method, triplets, tmp_path):
    """Checkpointing reruns the hooked layers in the backward pass: the same losses and LoRA as
    without it (the authors' loss with the memory mode), and the hooks are gone afterwards."""
    from safetensors.torch import load_file

    from relationbench.methods.lora.files import WEIGHT_NAME, read_loss_log

    runs = {}
    for checkpointing in (False, True):
        settings = dataclasses.replace(method.settings, train_steps=2, batch_size=2, predicate_loss_weight=0.5,
                                       gradient_checkpointing=checkpointing)
        other = RelationBoothMethod(settings, method.context)
        other.load()  # the backbone's cached pipeline: processors put back by close()
        try:
            runs[checkpointing] = other.train_relation(triplets.relations["hug"], tmp_path / str(checkpointing),
                                                       info={})
        finally:
            other.close()
    logs = [[r["loss"] for r in read_loss_log(runs[c])] for c in (False, True)]
    assert logs[0] == pytest.approx(logs[1], rel=1e-6)
    a, b = load_file(runs[False] / WEIGHT_NAME), load_file(runs[True] / WEIGHT_NAME)
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert not any(m._forward_hooks for m in method.pipe.unet.modules())


def test_training_without_the_kml_needs_no_reference_latents(method, triplets, tmp_path):
    """kml_weight 0 and the no-relation-data ablation train end to end with ref_latents None
    (no reference latents encoded): a LoRA and a two-step loss log each; the blank image
    prompts change the conditioning, so their losses differ from kml_weight 0's."""
    from relationbench.methods.lora.files import WEIGHT_NAME, read_loss_log

    losses = {}
    for name, change in (("no-kml", {"kml_weight": 0.0}), ("no-data", {"relation_data": False})):
        settings = dataclasses.replace(method.settings, train_steps=2, batch_size=2, **change)
        other = RelationBoothMethod(settings, method.context)
        other.load()
        try:
            folder = other.train_relation(triplets.relations["hug"], tmp_path / name, info={})
        finally:
            other.close()
        assert (folder / WEIGHT_NAME).is_file()
        losses[name] = [r["loss"] for r in read_loss_log(folder)]
        assert len(losses[name]) == 2
    # blank image prompts change the conditioning, so the losses differ from no-kml's
    assert losses["no-kml"] != losses["no-data"]


def test_refuses_what_it_cannot_train(method, triplets, tmp_path):
    """A v-prediction model (eq. 5 reads the UNet output as noise) and fused projections
    (a fused copy bypasses the LoRA) stop before anything trains."""
    from types import SimpleNamespace

    from diffusers import EulerDiscreteScheduler

    with pytest.raises(UserError, match="v_prediction"):
        training_scheduler(SimpleNamespace(scheduler=EulerDiscreteScheduler(prediction_type="v_prediction")))
    fused = RelationBoothMethod(dataclasses.replace(method.settings, fuse_projections=True), method.context)
    with pytest.raises(UserError, match="fuse_projections=false"):
        fused.train_relation(triplets.relations["wave"], tmp_path / "lora", info={})
    assert fused.adapter is None and not (tmp_path / "lora").exists()
