"""`relbench train` on the tiny backbone and the example triplets: a LoRA per relation whose loss
goes down, in the bank with its settings and loss log, touching only the text path of attn2 and
loadable by diffusers; a rerun skips, a --set variant trains a new entry; an interrupted training
continues only with --resume and ends as an uninterrupted one; bad data stops everything before
training with every problem listed; generation switches in each relation's LoRA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.data.triplets import load_triplets
from relationbench.methods.lora.bank import LoraBank
from relationbench.methods.lora.files import LOSS_LOG_NAME, SETTINGS_NAME, WEIGHT_NAME, read_loss_log
from relationbench.methods.relationbooth import training

from .lora_reference import merged
from .score_runs import make_references

pytestmark = pytest.mark.usefixtures("one_thread")

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SMALL = ["--set", "resolution=64", "--set", "batch_size=2"]  # a quicker schedule where the card's is not the point


def relbench(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "triplets"
    relbench("data", "example-triplets", root)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The card's tiny schedule on both relations, into a fresh bank: (bank, CLI output, calls:
    how often the run loaded the image encoder and encoded a relation's samples)."""
    from relationbench.methods.msdiffusion.method import MSDiffusionMethod

    bank = tmp_path_factory.mktemp("bank") / "loras"
    calls = {"load": 0, "encode": []}
    load, encode = MSDiffusionMethod._load_image_encoder, training.encode_samples

    def counted_load(self):
        calls["load"] += 1
        return load(self)

    def counted_encode(method, samples, *args, **kw):
        calls["encode"].append(sorted({s.relation for s in samples}))
        return encode(method, samples, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MSDiffusionMethod, "_load_image_encoder", counted_load)
        mp.setattr(training, "encode_samples", counted_encode)
        out = relbench("train", "--data", data, "--backbone", "tiny", "--out", bank, "--quiet").output
    return LoraBank(bank), out, calls


def test_trains_a_lora_per_relation_whose_loss_goes_down(trained, data):
    bank, out, calls = trained
    # the model loads once for the run; each relation's samples are encoded once
    assert calls == {"load": 1, "encode": [["hug"], ["wave"]]}
    entries = {e.info["relation"]: e for e in bank.entries()}
    assert sorted(entries) == ["hug", "wave"]
    unet = get_backbone("tiny").sdxl_pipeline().unet
    attn2 = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    for relation, entry in entries.items():
        folder = bank.folder(entry.name)
        assert entry.name.startswith(f"{relation}-") and f"{relation}: trained in" in out and entry.name in out
        assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHT_NAME, SETTINGS_NAME, LOSS_LOG_NAME])
        record = json.loads((folder / SETTINGS_NAME).read_text())
        assert record["settings"]["train_steps"] == 30 and record["settings"]["learning_rate"] == 1e-2  # tiny schedule
        assert record["info"]["relation"] == relation and record["info"]["samples"] == ["0", "1", "2", "3", "4"]
        assert record["info"]["batch_size"] == 4 and record["info"]["kml"]["weight"] == 1e-3
        assert entry.base["name"] == "tiny" and entry.info["data_sha256"] == record["info"]["data_sha256"] == \
            load_triplets(data).content_hash(relation)
        losses = [r["loss"] for r in read_loss_log(folder)]
        assert len(losses) == 30 and sum(losses[:10]) / 10 > sum(losses[-10:]) / 10 + 0.02, losses
        # only the text path of every cross-attention layer: attn2 to_q / to_k / to_v / to_out.0
        state = load_file(folder / WEIGHT_NAME)
        assert set(state) == {f"unet.{a}.{p}.lora.{d}.weight" for a in attn2 for p in PROJECTIONS
                              for d in ("down", "up")}


def test_the_lora_loads_in_diffusers_as_trained(trained):
    bank, _, _ = trained
    name = next(e.name for e in bank.entries() if e.info["relation"] == "hug")
    pipe = get_backbone("tiny").sdxl_pipeline()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    cond = dict(encoder_hidden_states=torch.randn(1, 77, 96, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)})
    with torch.no_grad():
        base = pipe.unet(x, t, **cond).sample
        expected = merged(pipe.unet, load_file(bank.weights(name)))(x, t, **cond).sample
    pipe.load_lora_weights(str(bank.folder(name)), weight_name=WEIGHT_NAME, adapter_name="hug")
    try:
        with torch.no_grad():
            got = pipe.unet(x, t, **cond).sample
    finally:
        pipe.unload_lora_weights()
    assert not torch.allclose(got, base, atol=1e-4) and torch.allclose(got, expected, atol=1e-5)


def test_a_rerun_skips_and_a_variant_trains_a_new_entry(trained, data):
    bank, _, _ = trained
    before = {e.name for e in bank.entries()}
    out = relbench("train", "--data", data, "--backbone", "tiny", "--out", bank.root, "--quiet").output
    assert "hug: already trained" in out and "wave: already trained" in out
    assert {e.name for e in bank.entries()} == before
    out = relbench("train", "--data", data, "--backbone", "tiny", "--out", bank.root, "--quiet", "--relation", "wave",
                   "--set", "learning_rate=0.02", "--set", "train_steps=3").output
    new = {e.name for e in bank.entries()} - before
    assert len(new) == 1 and new.pop().startswith("wave-") and "wave: trained" in out and "hug" not in out


class Killed(RuntimeError):
    pass


def test_an_interrupted_training_resumes_only_when_asked(data, tmp_path, monkeypatch):
    args = ["train", "--data", data, "--backbone", "tiny", "--quiet", "--relation", "wave", *SMALL,
            "--set", "train_steps=4", "--set", "checkpoint_every=2"]
    whole = LoraBank(tmp_path / "whole")
    relbench(*args, "--out", whole.root)

    calls = []
    real = training.RelationBatches.__call__

    def dies_in_step_3(self, gen):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(self, gen)

    monkeypatch.setattr(training.RelationBatches, "__call__", dies_in_step_3)
    bank = LoraBank(tmp_path / "bank")
    assert isinstance(relbench(*args, "--out", bank.root, ok=False).exception, Killed)
    monkeypatch.setattr(training.RelationBatches, "__call__", real)
    name = whole.entries()[0].name
    checkpoints = bank.root / f".{name}.checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"] and not bank.entries()

    refused = relbench(*args, "--out", bank.root, ok=False)
    assert refused.exit_code == 2 and str(checkpoints) in refused.output and "--resume" in refused.output
    assert not bank.entries()
    relbench(*args, "--out", bank.root, "--resume")
    a, b = load_file(whole.weights(name)), load_file(bank.weights(name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda lb: [(r["step"], r["loss"]) for r in read_loss_log(lb.folder(name))]  # noqa: E731
    assert log(bank) == log(whole) and not checkpoints.exists()


def test_bad_data_stops_before_training_with_every_problem(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "hug" / "0" / "reference1.png").unlink()
    mask = bad / "wave" / "1" / "mask0.png"
    from PIL import Image

    Image.new("L", (64, 64), 255).save(mask)
    manifest = bad / "hug" / "triplets.json"
    record = json.loads(manifest.read_text())
    record["samples"][2]["references"].pop()  # the tiger without a reference
    manifest.write_text(json.dumps(record))
    bank = tmp_path / "bank"
    result = relbench("train", "--data", bad, "--backbone", "tiny", "--out", bank, "--quiet", ok=False)
    assert result.exit_code == 2
    for what in ("reference1.png", str(mask), "sample 2"):
        assert what in result.output, result.output
    assert not bank.exists()
    result = relbench("train", "--data", data, "--backbone", "tiny", "--out", bank, "--relation", "ride", ok=False)
    assert result.exit_code == 2 and "ride" in result.output and not bank.exists()


def test_generate_switches_in_the_relation_lora(trained, data, tmp_path):
    """Cases grouped by relation ("shake hands with" is the relation shake_hands_with), each
    sampled with its relation's newest LoRA of the card's settings (never one trained with
    other settings: tests/test_relationbooth_generation.py); the same sampling without a LoRA
    differs."""
    bank, _, _ = trained
    more = tmp_path / "more"
    shutil.copytree(data / "hug", more / "hug")
    shutil.copytree(data / "hug", more / "shake_hands_with")  # hug's data under another relation name
    relbench("train", "--data", more, "--backbone", "tiny", "--out", bank.root, "--quiet", "--set", "train_steps=2")
    make_references(tmp_path / "data", ["rb-s-001", "rb-m-008"])
    common = ["generate", "--backbone", "tiny", "--suite", "relationbench", "--images-per-case", "1",
              "--data-dir", tmp_path / "data", "--quiet", "--set", "steps=2", "--batch-size", "2"]
    relbench(*common, "--cases", "rb-s-001", "--method", "relationbooth", "--set", f"bank={bank.root}",
             "--out", tmp_path / "rb")
    relbench(*common, "--cases", "rb-m-008", "--method", "relationbooth", "--set", f"bank={bank.root}",
             "--set", "train_steps=2", "--out", tmp_path / "rb-variant")
    relbench(*common, "--cases", "rb-s-001", "--method", "msdiffusion", "--set", "guidance_scale=5.0",
             "--out", tmp_path / "ms")
    lines = {r["case_id"]: r for run in ("rb", "rb-variant")
             for r in map(json.loads, (tmp_path / run / "manifest.jsonl").read_text().splitlines())}
    hug = [e.name for e in sorted(bank.entries(), key=lambda e: e.created) if e.info["relation"] == "hug"]
    shake = [e.name for e in bank.entries() if e.info["relation"] == "shake_hands_with"]
    assert len(hug) == 2 and lines["rb-s-001"]["lora"] == hug[0]  # the card's, not the newer variant
    assert lines["rb-m-008"]["lora"] == shake[0]  # the variant's own
    image = lambda run: (tmp_path / run / "images" / "rb-s-001" / "0.png").read_bytes()  # noqa: E731
    assert image("rb") != image("ms")  # the same sampling but for the LoRA
    empty = relbench(*common, "--cases", "rb-s-001", "--method", "relationbooth", "--set",
                     f"bank={tmp_path / 'none'}", "--out", tmp_path / "x", ok=False)
    assert empty.exit_code == 2 and "1 relation(s): hug" in " ".join(empty.output.split())


def test_one_lora_trains_data_parallel_under_accelerate_launch(data, tmp_path):
    """Two CPU processes train each LoRA together: one report, one bank entry (its own: two
    processes make a bigger batch) whose first loss is neither process's alone."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    args = ["train", "--data", str(data), "--backbone", "tiny", "--quiet", "--relation", "wave", *SMALL,
            "--set", "train_steps=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "relationbench.cli",
           *args, "--out", str(tmp_path / "launch")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wave: trained") == 1
    relbench(*args, "--out", tmp_path / "alone")
    launch, alone = LoraBank(tmp_path / "launch"), LoraBank(tmp_path / "alone")
    assert len(launch.entries()) == len(alone.entries()) == 1
    assert sorted(p.name for p in launch.root.iterdir()) == sorted([launch.entries()[0].name, "index.json",
                                                                     "index.json.lock"])  # no leftovers
    (a,), (b,) = launch.entries(), alone.entries()
    assert a.name != b.name and a.name.startswith("wave-")
    first = lambda bank, e: read_loss_log(bank.folder(e.name))[0]["loss"]  # noqa: E731
    assert first(launch, a) != first(alone, b)
