"""The method lifecycle in the run loop: groups, load before any write, close undoes changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from relationbench.cli import cli
from relationbench.generate import group_batches
from relationbench.methods import Context, Request
from relationbench.runs import sample_seed
from relationbench.suites import load_suite

from . import fake_methods
from .test_methods_registry import dreambench_only_cases

CASES = ["rb-s-001", "rb-m-001", "rb-s-002", "rb-m-002", "rb-s-003"]


def test_group_batches_order_and_cut():
    suite = load_suite("relationbench")
    work = [Request(suite.case(c), k, 0) for c in CASES for k in range(2)]
    batches = group_batches(work, lambda case: case.kind, 4)
    kinds = [[r.case.kind for r in b] for b in batches]
    assert kinds == [["single"] * 4, ["single"] * 2, ["multi"] * 4]
    # within a group, requests keep their order; nothing lost, nothing twice
    flat = [(r.case.id, r.index) for b in batches for r in b]
    assert sorted(flat) == sorted((c, k) for c in CASES for k in range(2))
    assert flat[:6] == [(c, k) for c in ("rb-s-001", "rb-s-002", "rb-s-003") for k in range(2)]
    assert [len(b) for b in group_batches(work, lambda case: None, 4)] == [4, 4, 2]


def _run(card: Path, out: Path, batch: int) -> dict[tuple[str, int], bytes]:
    res = CliRunner().invoke(cli, ["generate", "--method", str(card), "--backbone", "tiny", "--quiet", "--cases",
                                   ",".join(CASES), "--images-per-case", "2", "--batch-size", str(batch),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    suite = load_suite("relationbench")
    for r in records:
        assert r["seed"] == sample_seed(suite.case(r["case_id"]).seed, r["index"])
    return {(r["case_id"], r["index"]): (out / r["path"]).read_bytes() for r in records}


def test_groups_set_up_once_images_unchanged(tmp_path):
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text("name: grouped\nadapter: tests.fake_methods:GroupedSDXL\nsettings: {steps: 2}\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: plain\nadapter: relationbench.methods.sdxl:SDXLMethod\nsettings: {steps: 2}\n")
    fake_methods.GROUP_SETUPS.clear()
    by_group = _run(grouped, tmp_path / "g", batch=3)
    assert fake_methods.GROUP_SETUPS == ["single", "multi"]  # each group set up once, singles first
    in_order = _run(plain, tmp_path / "p", batch=3)
    assert by_group.keys() == in_order.keys() and len(by_group) == 10
    assert all(by_group[k] == in_order[k] for k in by_group)  # seeds are per request: same bytes


@pytest.fixture
def dreambench_data(tmp_path, shared_dreambench) -> Path:
    data = tmp_path / "data"
    res = CliRunner().invoke(cli, ["data", "import", "dreambench", str(shared_dreambench), "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    return data


def test_weight_error_leaves_nothing_written(tmp_path, dreambench_data):
    """A bad sdxl folder fails in load(), before the run folder exists; the corrected command
    then runs into the same folder (it used to be refused as 'a different run')."""
    bad = tmp_path / "not-sdxl"
    bad.mkdir()
    (bad / "model_index.json").write_text("{}")
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    ckpt = tmp_path / "ms_adapter.bin"
    ckpt.write_bytes(b"junk")
    out = tmp_path / "run"
    case = dreambench_only_cases()[0]
    args = ["generate", "--method", "msdiffusion", "--cases", case, "--images-per-case", "1", "--quiet",
            "--data-dir", str(dreambench_data), "--out", str(out), "--set", "steps=1"]
    res = CliRunner().invoke(cli, [*args, "--weight", f"sdxl={bad}", "--weight", f"image_encoder={encoder}",
                                   "--weight", f"msdiffusion={ckpt}"])
    assert res.exit_code == 2, res.output
    assert "not-sdxl" in res.output and not out.exists()
    res = CliRunner().invoke(cli, [*args, "--backbone", "tiny"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["backbone"]["name"] == "tiny"


def test_wrong_image_encoder_leaves_nothing_written(tmp_path, dreambench_data, monkeypatch):
    """A ViT-H encoder (the SD 1.5 IP-Adapter's, hidden 1024) is refused in load(), before any write."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from relationbench.methods.msdiffusion import method as ms_method

    vit_h = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=224, patch_size=14))
    monkeypatch.setattr(ms_method, "load_image_encoder", lambda backbone: vit_h)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["generate", "--method", "msdiffusion", "--backbone", "tiny", "--quiet",
                                   "--cases", dreambench_only_cases()[0], "--data-dir", str(dreambench_data),
                                   "--out", str(out)])
    assert res.exit_code == 2 and "hidden size 1024" in res.output and not out.exists()


def test_msdiffusion_loads_each_model_once(tmp_path, dreambench_data, monkeypatch):
    """One image encoder load per run, and each reference image encoded once, however many
    requests name it."""
    from relationbench.methods.msdiffusion import method as ms_method

    loads, encoded = [], []
    real_load = ms_method.load_image_encoder
    monkeypatch.setattr(ms_method, "load_image_encoder", lambda backbone: loads.append(1) or real_load(backbone))
    real_encode = ms_method.MSDiffusionMethod.encode_references

    def counting(self, paths):
        encoded.extend(p for p in dict.fromkeys(paths) if p not in self._embeds)
        return real_encode(self, paths)

    monkeypatch.setattr(ms_method.MSDiffusionMethod, "encode_references", counting)
    res = CliRunner().invoke(cli, ["generate", "--method", "msdiffusion", "--backbone", "tiny", "--quiet",
                                   "--set", "steps=1", "--cases", ",".join(dreambench_only_cases()),
                                   "--images-per-case", "2", "--batch-size", "1", "--data-dir", str(dreambench_data),
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    suite = load_suite("relationbench")
    subjects = {s.name for c in dreambench_only_cases() for s in suite.case(c).subjects}
    assert len(loads) == 1 and len(encoded) == len(set(encoded)) == len(subjects)
    # driven without the run loop, the first encoding loads everything, the encoder once too
    from relationbench.backbones import get_backbone

    loads.clear()
    method = ms_method.MSDiffusionMethod(ms_method.MSDiffusionSettings(steps=1),
                                         Context(get_backbone("tiny"), "cpu", torch.float32, dreambench_data))
    case = suite.case(dreambench_only_cases()[0])
    method.encode_references([method.reference(case.subjects[0])])
    assert len(loads) == 1
    method.close()


def test_reference_index_out_of_range_is_an_error(tmp_path, dreambench_data):
    out = tmp_path / "run"
    case = dreambench_only_cases()[0]
    res = CliRunner().invoke(cli, ["generate", "--method", "msdiffusion", "--backbone", "tiny", "--cases", case,
                                   "--quiet", "--data-dir", str(dreambench_data), "--out", str(out),
                                   "--set", "reference_index=40"])
    assert res.exit_code == 2, res.output
    subject = load_suite("relationbench").case(case).subjects[0]
    assert f"reference_index 40 is out of range for subject {subject.name!r}" in res.output
    assert "reference image(s)" in res.output and not out.exists()


def test_close_restores_the_shared_pipeline(tmp_path, dreambench_data):
    """MS-Diffusion installs processors on the backbone's cached pipeline; after close(), plain
    SDXL on that pipeline draws exactly what it drew before."""
    from relationbench.backbones import get_backbone
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings
    from relationbench.methods.msdiffusion.attention import MSCrossAttnProcessor
    from relationbench.methods.sdxl import SDXLMethod, SDXLSettings

    ctx = Context(get_backbone("tiny"), "cpu", torch.float32, dreambench_data)
    case = load_suite("relationbench").case(dreambench_only_cases()[1])
    request = [Request(case, 0, 5)]
    sdxl = SDXLMethod(SDXLSettings(steps=2), ctx)
    sdxl.load()
    before = {name: type(p) for name, p in sdxl.pipe.unet.attn_processors.items()}
    first = sdxl.generate(request)[0].image.tobytes()
    ms = MSDiffusionMethod(MSDiffusionSettings(steps=2), ctx)
    ms.load()
    assert ms.pipe is sdxl.pipe  # one shared pipeline
    assert any(isinstance(p, MSCrossAttnProcessor) for p in sdxl.pipe.unet.attn_processors.values())
    ms.prepare([case])
    ms.generate(request)
    ms.close()
    assert {name: type(p) for name, p in sdxl.pipe.unet.attn_processors.items()} == before
    assert sdxl.generate(request)[0].image.tobytes() == first


def test_fuse_projections_setting_same_images_and_undone_by_close(tmp_path, dreambench_data):
    from diffusers.models.attention_processor import Attention

    from relationbench.backbones import get_backbone
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings

    ctx = Context(get_backbone("tiny"), "cpu", torch.float32, dreambench_data)
    case = load_suite("relationbench").case(dreambench_only_cases()[1])
    request = [Request(case, 0, 5)]
    images = {}
    for fuse in (False, True):
        ms = MSDiffusionMethod(MSDiffusionSettings(steps=2, fuse_projections=fuse), ctx)
        ms.load()
        attention = [m for m in ms.pipe.unet.modules() if isinstance(m, Attention)]
        assert all(m.fused_projections == fuse for m in attention)
        ms.prepare([case])
        images[fuse] = ms.generate(request)[0].image.tobytes()
        ms.close()
        assert not any(m.fused_projections or hasattr(m, "to_kv") or hasattr(m, "to_qkv") for m in attention)
    assert images[True] == images[False]
