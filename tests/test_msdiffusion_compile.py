"""torch.compile traces MS-Diffusion's UNet once per sampling call: no data-dependent shapes,
no per-step state a guard could see change (masks, image keys/values and the auto layout's
running sums are prepared before the loop). Counted with dynamo's own counters, on the tiny
backbone with the cheap "eager" backend (it traces, but runs the graph as is)."""

from __future__ import annotations

import pytest
import torch

from .score_runs import make_references


@pytest.fixture
def dynamo():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("auto_layout", [False, True], ids=["boxes", "auto_layout"])
def test_unet_compiles_once_over_a_sampling_call(tmp_path, dynamo, auto_layout):
    """Three guided steps of a two-subject case: one graph, no graph break, no recompile (the
    auto layout switches from boxes to attention maps at its start step by a tensor select,
    so it needs no second graph either), the same image as without compiling, and no new
    graph for the next sampling call of the same shapes."""
    from relationbench.backbones import get_backbone
    from relationbench.methods import Context, Request
    from relationbench.methods.msdiffusion import MSDiffusionMethod, MSDiffusionSettings
    from relationbench.suites import load_suite

    make_references(tmp_path, ["rb-m-001"])
    settings = MSDiffusionSettings(steps=3, mask_threshold=0.5 if auto_layout else None, start_step=2)
    method = MSDiffusionMethod(settings, Context(get_backbone("tiny"), "cpu", torch.float32, tmp_path))
    req = [Request(load_suite("relationbench").case("rb-m-001"), 0, 4)]
    eager = method.generate(req)[0].image
    method.pipe.unet.compile(backend="eager", fullgraph=True)
    compiled = method.generate(req)[0].image
    assert dynamo["stats"]["unique_graphs"] == 1
    assert not dynamo["graph_break"]
    assert compiled.tobytes() == eager.tobytes()
    # the next call of the run (a new conditioning, same shapes) reuses the graph
    method.generate([Request(req[0].case, 1, 5)])
    assert dynamo["stats"]["unique_graphs"] == 1
