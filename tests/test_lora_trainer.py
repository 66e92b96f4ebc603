"""The generic LoRA trainer on the tiny UNet: it learns, resumes exactly, writes the diffusers
format with its settings and loss log, accumulates like a bigger batch, leaves the model as it
was, and trains one LoRA data-parallel under `accelerate launch` (two CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from relationbench.backbones import get_backbone
from relationbench.errors import UserError
from relationbench.methods.lora.files import LOSS_LOG_NAME, SETTINGS_NAME, WEIGHT_NAME, read_loss_log
from relationbench.methods.lora.trainer import TrainerSettings, rank_seed, train_lora

from .conftest import REPO
from .lora_reference import merged

TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # RelationLoRA's modules


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return get_backbone("tiny").sdxl_pipeline()


def _cond(n: int, g: torch.Generator) -> dict:
    return dict(encoder_hidden_states=torch.randn(n, 77, 96, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(n, 32, generator=g),
                                   "time_ids": torch.randn(n, 6, generator=g)})


def draw(g: torch.Generator, n: int = 1) -> dict:
    """A random micro-batch of n rows: 64 px latents, timesteps, conditioning, a target."""
    return {"x": torch.randn(n, 4, 8, 8, generator=g), "t": torch.randint(0, 1000, (n,), generator=g),
            **_cond(n, g), "target": torch.randn(n, 4, 8, 8, generator=g)}


def mse(unet, b) -> torch.Tensor:
    pred = unet(b["x"], b["t"], encoder_hidden_states=b["encoder_hidden_states"],
                added_cond_kwargs=b["added_cond_kwargs"]).sample
    return ((pred.float() - b["target"]) ** 2).mean()


def snapshot(model: torch.nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "training": model.training,
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "checkpointing": model.is_gradient_checkpointing}


def assert_restored(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["training"] == before["training"] and after["grad"] == before["grad"]
    assert after["checkpointing"] == before["checkpointing"] is False
    assert not hasattr(model, "peft_config")


def test_learns_a_fixed_batch_writes_files_restores_model(tmp_path, pipe):
    unet = pipe.unet
    before = snapshot(unet)
    fixed = draw(torch.Generator().manual_seed(1), 2)
    s = TrainerSettings(train_steps=6, gradient_accumulation=1, learning_rate=1e-2, alpha=8, seed=3)
    out = train_lora(unet, TARGETS, lambda g: fixed, mse, s, tmp_path / "lora", info={"note": "x"}, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHT_NAME, SETTINGS_NAME, LOSS_LOG_NAME])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no temp folder, no checkpoints
    log = read_loss_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(r["lr"] == 1e-2 and r["seconds"] > 0 for r in log)
    with torch.no_grad():
        base_loss = mse(unet, fixed).item()
    assert log[0]["loss"] == pytest.approx(base_loss, rel=1e-5)  # B starts at zero: the base model's loss
    losses = [r["loss"] for r in log]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    recorded = json.loads((out / SETTINGS_NAME).read_text())
    assert recorded["settings"]["alpha"] == 8 and recorded["targets"] == {"unet": list(TARGETS)}
    assert recorded["info"] == {"note": "x"}
    assert_restored(unet, before)

    # the file: unet.-prefixed diffusers keys on every cross-attention projection; loaded by diffusers it
    # applies W + (alpha / rank) * up @ down (the scale folded into up), checked by merging by hand
    state = load_file(out / WEIGHT_NAME)
    attn2 = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert {k.rsplit(".lora", 1)[0] for k in state} == {f"unet.{a}.{t}" for a in attn2 for t in
                                                        ("to_q", "to_k", "to_v", "to_out.0")}
    with torch.no_grad():
        expected = mse(merged(unet, state), fixed).item()
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME, adapter_name="check")
    try:
        with torch.no_grad():
            assert mse(unet, fixed).item() == pytest.approx(expected, rel=1e-5)
            assert expected < log[-1]["loss"]
    finally:
        pipe.unload_lora_weights()
    # the saved LoRA is the trained one (alpha / rank = 2 applied once): 5 steps of the same training,
    # loaded, give the loss the 6-step training logged at its step 6 (its model after 5 updates)
    five = train_lora(unet, TARGETS, lambda g: fixed, mse, TrainerSettings(**{**s.__dict__, "train_steps": 5}),
                      tmp_path / "five", progress=False)
    with torch.no_grad():
        assert mse(merged(unet, load_file(five / WEIGHT_NAME)), fixed).item() == pytest.approx(log[5]["loss"], rel=1e-4)


class Killed(RuntimeError):
    pass


def test_checkpoint_and_resume_give_the_uninterrupted_weights(tmp_path, pipe):
    s = TrainerSettings(train_steps=3, gradient_accumulation=2, learning_rate=1e-3, checkpoint_every=2)
    whole = train_lora(pipe.unet, TARGETS, draw, mse, s, tmp_path / "whole", progress=False)

    calls = []

    def dies_in_step_3(unet, batch):
        calls.append(1)
        if len(calls) == 5:  # step 3's first micro-batch
            raise Killed
        return mse(unet, batch)

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train_lora(pipe.unet, TARGETS, draw, dies_in_step_3, s, out, progress=False)
    assert not out.exists()  # never a half LoRA
    assert [p.name for p in (tmp_path / ".resumed.checkpoints").iterdir()] == ["step-000002"]
    assert not any("lora" in k for k in pipe.unet.state_dict())

    with pytest.raises(UserError, match="other settings"):
        train_lora(pipe.unet, TARGETS, draw, mse, TrainerSettings(**{**s.__dict__, "learning_rate": 2e-3}), out,
                   progress=False)
    calls.clear()  # the checkpoint interval is not part of what it learns: it may change on resume
    train_lora(pipe.unet, TARGETS, draw, dies_in_step_3, TrainerSettings(**{**s.__dict__, "checkpoint_every": 0}), out,
               progress=False)
    assert len(calls) == 2  # step 3 only, 2 micro-batches
    a, b = load_file(whole / WEIGHT_NAME), load_file(out / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = lambda folder: [(r["step"], r["loss"]) for r in read_loss_log(folder)]  # noqa: E731
    assert steps(out) == steps(whole)
    assert not (tmp_path / ".resumed.checkpoints").exists()
    with pytest.raises(FileExistsError):
        train_lora(pipe.unet, TARGETS, draw, mse, s, out, progress=False)


def test_accumulation_matches_a_bigger_batch(tmp_path, pipe):
    """accumulation 2 x batch 1 == batch 2 of the same rows (each draw takes its rows in turn)."""
    s = dict(train_steps=2, learning_rate=1e-3, max_grad_norm=0.05)  # clipping on: the norm of the summed gradient
    acc = train_lora(pipe.unet, TARGETS, draw, mse, TrainerSettings(gradient_accumulation=2, **s), tmp_path / "acc",
                     progress=False)

    def two_rows(g):
        a, b = draw(g), draw(g)
        cat = lambda x, y: torch.cat([x, y]) if torch.is_tensor(x) else {k: cat(x[k], y[k]) for k in x}
        return cat(a, b)

    big = train_lora(pipe.unet, TARGETS, two_rows, mse, TrainerSettings(gradient_accumulation=1, **s),
                     tmp_path / "big", progress=False)
    a, b = load_file(acc / WEIGHT_NAME), load_file(big / WEIGHT_NAME)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5)  # 5% of a step: Adam amplifies near-zero gradients
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if ".up." in k)


def test_bf16_autocast_and_gradient_checkpointing_on_cpu(tmp_path, pipe):
    before = snapshot(pipe.unet)
    s = TrainerSettings(train_steps=1, gradient_accumulation=1, mixed_precision="bf16", gradient_checkpointing=True)
    seen = []

    def loss(unet, batch):
        seen.append((torch.is_autocast_enabled("cpu"), unet.is_gradient_checkpointing))
        return mse(unet, batch)

    out = train_lora(pipe.unet, TARGETS, draw, loss, s, tmp_path / "bf16", progress=False)
    assert seen == [(True, True)]
    state = load_file(out / WEIGHT_NAME)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    assert_restored(pipe.unet, before)


def test_refuses_a_model_that_carries_adapters(tmp_path, pipe):
    out = train_lora(pipe.unet, TARGETS, draw, mse, TrainerSettings(train_steps=1, gradient_accumulation=1),
                     tmp_path / "a", progress=False)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME, adapter_name="loaded")
    try:
        with pytest.raises(ValueError, match="unload"):
            train_lora(pipe.unet, TARGETS, draw, mse, TrainerSettings(train_steps=1), tmp_path / "b", progress=False)
        assert pipe.get_list_adapters() == {"unet": ["loaded"]}
    finally:
        pipe.unload_lora_weights()


# -- data-parallel: one LoRA, two processes ------------------------------------------------------------------
TOY = textwrap.dedent('''
    import json, sys
    import torch
    from pathlib import Path


    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.out(torch.tanh(self.inp(x)))


    def draw(g):
        x = torch.randn(4, 8, generator=g)
        return x, torch.sin(3 * x)


    def mse(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()


    SETTINGS = dict(train_steps=3, gradient_accumulation=2, learning_rate=1e-2, checkpoint_every=2, seed=5)

    if __name__ == "__main__":
        from accelerate import PartialState
        from relationbench.methods.lora.trainer import TrainerSettings, train_lora

        state = PartialState(cpu=True)
        seen = []  # each process's LoRA weights at the start of every optimizer step

        def loss(model, batch):
            lora = [p.detach().clone() for n, p in model.named_parameters() if "lora" in n]
            seen.append(torch.cat([p.flatten() for p in lora]).tolist())
            return mse(model, batch)

        out, rank = Path(sys.argv[1]), state.process_index
        train_lora(Toy(), ("inp", "out"), draw, loss, TrainerSettings(**SETTINGS), out / "lora", progress=False)
        (out / f"seen{rank}.json").write_text(json.dumps(seen[::2]))
        # then each process a LoRA of its own (as a sharded generate trains its cases' LoRAs)
        train_lora(Toy(), ("inp", "out"), draw, mse, TrainerSettings(**{**SETTINGS, "seed": rank}), out / f"solo{rank}",
                   data_parallel=False, progress=False)
''')


def reference_data_parallel(toy, world: int) -> dict[str, torch.Tensor]:
    """One process replaying `world` processes: each draws from its own generator, the
    gradients of all of them are averaged, then clipped, then AdamW."""
    from peft import LoraConfig, inject_adapter_in_model

    s = TrainerSettings(**toy.SETTINGS)
    model = toy.Toy()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        inject_adapter_in_model(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian",
                                           target_modules=["inp", "out"]), model, adapter_name="ref")
    params = {n: p for n, p in model.named_parameters() if "lora" in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    opt = torch.optim.AdamW(params.values(), lr=s.learning_rate, weight_decay=s.weight_decay)
    gens = [torch.Generator().manual_seed(rank_seed(s.seed, r)) for r in range(world)]
    for _ in range(s.train_steps):
        for _ in range(s.gradient_accumulation):
            for g in gens:
                (toy.mse(model, toy.draw(g)) / (s.gradient_accumulation * world)).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), s.max_grad_norm)
        opt.step()
        opt.zero_grad()
    return {n.replace(".ref", ""): p.detach() for n, p in params.items()}


def test_one_lora_trained_data_parallel_by_two_processes(tmp_path):
    script = tmp_path / "toy_train.py"
    script.write_text(TOY)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both processes hold the same weights at every step; one file set, no checkpoint left
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == 3 and seen[0] == seen[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "seen0.json", "seen1.json", "solo0", "solo1",
                                                          "toy_train.py"]
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == sorted([WEIGHT_NAME, SETTINGS_NAME, LOSS_LOG_NAME])
    assert len(read_loss_log(tmp_path / "lora")) == 3
    # and they equal one process averaging the two processes' batches
    sys.path.insert(0, str(tmp_path))
    try:
        import toy_train
    finally:
        sys.path.remove(str(tmp_path))
    from diffusers.utils import convert_state_dict_to_diffusers

    expected = convert_state_dict_to_diffusers(reference_data_parallel(toy_train, world=2))
    state = load_file(tmp_path / "lora" / WEIGHT_NAME)
    assert state.keys() == {"unet." + k for k in expected}
    for name, value in expected.items():
        torch.testing.assert_close(state["unet." + name], value, rtol=1e-5, atol=1e-6)
    # data_parallel=False: process 1 trained alone, as this process does with its seed
    alone = train_lora(toy_train.Toy(), ("inp", "out"), toy_train.draw, toy_train.mse,
                       TrainerSettings(**{**toy_train.SETTINGS, "seed": 1}), tmp_path / "here", progress=False)
    a, b = load_file(alone / WEIGHT_NAME), load_file(tmp_path / "solo1" / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
