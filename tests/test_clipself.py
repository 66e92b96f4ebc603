"""CLIPSelf distillation of the local encoder on the tiny tower: the loss against a plain
computation, the data order, the trained checkpoint (open_clip layout) loading back with only
the trainable layers changed, exact resume, the loss going down, and `relbench
train-local-encoder` exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image, ImageDraw

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.methods.lora.files import read_loss_log
from relationbench.methods.msdiffusion.encoder import build_tiny_image_encoder
from relationbench.methods.relationbooth import clipself
from relationbench.methods.relationbooth.clipself import (CHECKPOINT_NAME, CHECKPOINTS, RECORD_NAME, CLIPSelfSettings,
                                                          batch_indices, distill, distillation_loss, region_loss,
                                                          resolve_settings)
from relationbench.methods.relationbooth.local_tokens import dense_features

from .test_local_tokens import load_local_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = dict(resolution=224, trainable_blocks=2, batch_size=2, checkpoint_every=0)  # the tiny schedule


def write_images(folder, count: int = 3):
    """Shapes on noise, different sizes (not square: read, resized, cropped like any photo)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (90 + 20 * i, 120, 3), dtype=np.uint8))
        ImageDraw.Draw(image).ellipse((10 + 10 * i, 20, 80, 70 + 10 * i), fill=(255, 40 * i, 0))
        image.save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("coco"))


def test_region_loss_is_one_minus_cosine_averaged_over_regions():
    student = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    teacher = torch.tensor([[0.0, 5.0, 0.0], [2.0, 4.0, 4.0]])  # orthogonal, then parallel: cosines 0 and 1
    assert region_loss(student, teacher).item() == pytest.approx(0.5)
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    assert region_loss(a, b).item() == pytest.approx(1 - 24 / 25)


def test_distillation_loss_equals_a_plain_computation():
    """Image 0 split 2 x 2 (boxes of 112 px = 8 x 8 cells), image 1 whole: student tokens are
    the cell means of its unnormalized dense features, projected; the teacher embeds each
    crop resized to 224; the loss averages 1 - cosine over the 5 regions."""
    student, teacher = build_tiny_image_encoder(0), build_tiny_image_encoder(1)
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    halves = [(0, 112), (112, 224)]
    quads = torch.tensor([[x0, y0, x1, y1] for y0, y1 in halves for x0, x1 in halves], dtype=torch.float32)
    whole = torch.tensor([[0.0, 0.0, 224.0, 224.0]])
    with torch.no_grad():
        got = distillation_loss(student, teacher, px, [quads, whole])
        dense = dense_features(student, px, normalize=False)
        pooled = [dense[0, r:r + 8, c:c + 8].mean((0, 1)) for r in (0, 8) for c in (0, 8)] + [dense[1].mean((0, 1))]
        tokens = torch.stack(pooled) @ student.visual_projection.weight.T
        crops = [px[0, :, y0:y1, x0:x1] for y0, y1 in halves for x0, x1 in halves] + [px[1]]
        crops = torch.stack([F.interpolate(c[None], size=(224, 224), mode="bicubic", antialias=True)[0] for c in crops])
        targets = teacher(pixel_values=crops).image_embeds
    cosines = [float(t @ u / (t.norm() * u.norm())) for t, u in zip(tokens, targets)]
    assert got.item() == pytest.approx(sum(1 - c for c in cosines) / 5, rel=1e-5)


def test_each_pass_sees_every_image_once_in_disjoint_process_slices():
    seen = [i for step in range(1, 6) for rank in range(2) for i in batch_indices(step, 10, 2, 2, rank, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != list(range(10))  # shuffled
    assert batch_indices(4, 10, 2, 2, 1, seed=3) == seen[14:16]  # from the step number alone
    assert seen[:10] != [i for s in range(1, 4) for r in range(2) for i in batch_indices(s, 10, 2, 2, r, seed=4)][:10]


def test_settings_defaults_tiny_schedule_set_and_steps():
    paper = resolve_settings()
    assert (paper.learning_rate, paper.weight_decay, paper.trainable_blocks, paper.resolution, paper.batch_size,
            paper.epochs) == (1e-5, 0.1, 24, 896, 2, 6)
    tiny = resolve_settings(["learning_rate=0.001"], tiny=True, steps=7)
    assert (tiny.resolution, tiny.trainable_blocks, tiny.learning_rate, tiny.steps) == (224, 2, 1e-3, 7)
    for bad, message in ((["learning_rte=1"], "did you mean learning_rate"), (["steps=x"], "steps must be"),
                         (["mixed_precision=fp8"], "mixed_precision must be")):
        with pytest.raises(UserError, match=message):
            resolve_settings(bad)


def frozen_and_trained(before: dict, after: dict) -> tuple[set, set]:
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return set(before) - changed, changed


def test_trained_checkpoint_loads_back_with_only_the_trainable_layers_changed(tmp_path, images):
    stock = build_tiny_image_encoder()
    settings = CLIPSelfSettings(**QUICK, steps=3, learning_rate=1e-3)
    result = distill(build_tiny_image_encoder(), images, tmp_path / "out", settings, info={"note": 1}, progress=False)
    out = tmp_path / "out"
    assert result.checkpoint == out / CHECKPOINT_NAME and result.steps == 3 and result.main
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKPOINT_NAME, RECORD_NAME, "loss.jsonl"])
    log = read_loss_log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and result.last_loss == log[-1]["loss"]
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["settings"]["learning_rate"] == 1e-3 and record["steps"] == 3 and record["info"] == {"note": 1}

    _, encoder = load_local_encoder(get_backbone("sdxl", {"local_encoder": str(result.checkpoint)}), stock)
    assert encoder.kind == "clipself"
    frozen, trained = frozen_and_trained(stock.state_dict(), encoder.tower.state_dict())
    last = "vision_model.encoder.layers.2."
    assert trained == {k for k in stock.state_dict() if k.startswith(("vision_model.encoder.layers.1.", last))
                       and not k.startswith((last + "self_attn.q_proj", last + "self_attn.k_proj"))}
    assert {"vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.post_layernorm.weight", "visual_projection.weight", last + "self_attn.q_proj.weight"} <= frozen
    picture = [Image.open(images[0]).convert("RGB").resize((512, 512))]
    stock_tokens = load_local_encoder(get_backbone("tiny"), stock)[1].tokens(picture, 16)
    assert not torch.allclose(encoder.tokens(picture, 16), stock_tokens, atol=1e-4)
    with pytest.raises(UserError, match="already holds"):
        distill(build_tiny_image_encoder(), images, out, settings, progress=False)


class Killed(RuntimeError):
    pass


def test_an_interrupted_distillation_resumes_to_the_uninterrupted_weights(tmp_path, images, monkeypatch):
    settings = CLIPSelfSettings(**{**QUICK, "checkpoint_every": 2}, steps=4, learning_rate=1e-3)
    whole = distill(build_tiny_image_encoder(), images, tmp_path / "whole", settings, progress=False)

    reads = []
    real_read = clipself.read_image

    def dies_in_step_3(path):
        reads.append(path)
        if len(reads) == 5:  # step 3's first image (2 a step)
            raise Killed
        return real_read(path)

    monkeypatch.setattr(clipself, "read_image", dies_in_step_3)
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        distill(build_tiny_image_encoder(), images, out, settings, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINTS]  # no half-written clipself.pt
    assert [p.name for p in (out / CHECKPOINTS).iterdir()] == ["step-000002"]
    with pytest.raises(UserError, match="--resume"):
        distill(build_tiny_image_encoder(), images, out, settings, progress=False)
    with pytest.raises(UserError, match="other settings"):
        distill(build_tiny_image_encoder(), images, out, CLIPSelfSettings(**{**settings.__dict__, "learning_rate": 2e-3}),
                resume=True, progress=False)
    reads.clear()
    resumed = distill(build_tiny_image_encoder(), images, out, settings, resume=True, progress=False)
    assert len(reads) == 4  # steps 3 and 4 only
    a = torch.load(whole.checkpoint, weights_only=True)["state_dict"]
    b = torch.load(resumed.checkpoint, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_loss_log(tmp_path / "whole") == [{**r, "seconds": w["seconds"]} for r, w in
                                                 zip(read_loss_log(out), read_loss_log(tmp_path / "whole"))]
    assert not (out / CHECKPOINTS).exists()


def test_the_loss_goes_down_on_tiny(tmp_path):
    one = write_images(tmp_path / "one", count=1)
    settings = CLIPSelfSettings(**{**QUICK, "batch_size": 1}, steps=30, learning_rate=3e-3, max_split=2)
    result = distill(build_tiny_image_encoder(), one, tmp_path / "out", settings, progress=False)
    losses = [r["loss"] for r in read_loss_log(tmp_path / "out")]
    assert result.steps == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def relbench(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_exit_codes(tmp_path, images):
    folder = images[0].parent
    ok = relbench("train-local-encoder", "--images", folder, "--backbone", "tiny", "--out", tmp_path / "enc",
                  "--steps", 2, "--quiet")
    assert ok.exit_code == 0, ok.output + repr(ok.exception)
    assert f"{tmp_path / 'enc' / CHECKPOINT_NAME}: loss" in ok.output and "over 2 steps" in ok.output
    record = json.loads((tmp_path / "enc" / RECORD_NAME).read_text())
    assert record["settings"]["resolution"] == 224 and record["info"]["images"]["count"] == 3
    (tmp_path / "empty").mkdir()
    for args, message in (
        (["--images", tmp_path / "empty"], "holds no image files"),
        (["--images", tmp_path / "missing"], "no such folder"),
        (["--images", folder, "--set", "trainable_blocks=4"], "at most 3"),
        (["--images", folder, "--out", tmp_path / "enc"], "already holds"),
        (["--images", folder, "--weight", f"local_encoder={tmp_path}"], "has no use here"),
    ):
        failed = relbench("train-local-encoder", "--backbone", "tiny", "--out", tmp_path / "other", "--quiet", *args)
        assert failed.exit_code == 2 and message in failed.output, failed.output
    assert not (tmp_path / "other").exists()


LAUNCHED = '''
import sys
from pathlib import Path

import torch

from relationbench.methods.msdiffusion.encoder import build_tiny_image_encoder
from relationbench.methods.relationbooth.clipself import CLIPSelfSettings, distill, image_files

torch.set_num_threads(1)
folder, out = map(Path, sys.argv[1:])
distill(build_tiny_image_encoder(), image_files(folder), out, CLIPSelfSettings(**SETTINGS), progress=False)
'''


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_train_one_encoder_on_averaged_gradients(tmp_path, images):
    import copy
    import os
    import subprocess
    import sys

    from relationbench.images import read_image
    from relationbench.methods.lora.trainer import rank_seed
    from relationbench.methods.relationbooth.clipself import draw_regions, trainable_parameters
    from relationbench.methods.relationbooth.local_tokens import clip_pixels, hf_to_openclip

    from .conftest import REPO

    settings = {**QUICK, "batch_size": 1, "steps": 2, "learning_rate": 1e-3}
    script = tmp_path / "launched.py"
    script.write_text(f"SETTINGS = {settings!r}\n{LAUNCHED}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(images[0].parent), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([CHECKPOINT_NAME, RECORD_NAME, "loss.jsonl"])

    # one process replaying both: each its own images and region draws, the two losses averaged
    s = CLIPSelfSettings(**settings)
    tower = build_tiny_image_encoder()
    teacher = copy.deepcopy(tower).eval().requires_grad_(False)
    params = trainable_parameters(tower, s.trainable_blocks)
    optimizer = torch.optim.AdamW(params.values(), lr=s.learning_rate, weight_decay=s.weight_decay)
    generators = [torch.Generator().manual_seed(rank_seed(s.seed, rank)) for rank in (0, 1)]
    for step in (1, 2):
        for rank, generator in enumerate(generators):
            paths = [images[i] for i in batch_indices(step, len(images), 1, 2, rank, s.seed)]
            regions = [draw_regions(generator, s.max_split, s.resolution) for _ in paths]
            px = clip_pixels([read_image(p) for p in paths], s.resolution)
            (distillation_loss(tower, teacher, px, regions) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = hf_to_openclip(tower.state_dict())
    got = torch.load(tmp_path / "out" / CHECKPOINT_NAME, weights_only=True)["state_dict"]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
