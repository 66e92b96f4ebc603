"""Test-wide settings: never touch the network, keep caches inside the test's tmp dirs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # batch-invariant CPU GEMMs (generate.py)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests (tests/test_properties.py) draw the same examples on every run and machine:
# derandomize seeds each test from its own name and no example database carries examples
# between runs, so CI is deterministic and a failure reproduces as is. HYPOTHESIS_PROFILE=
# explore draws fresh random examples, ten times as many, remembered in .hypothesis/.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_dreambench() -> Path:
    path = SHARED / "data" / "dreambench"
    if not path.is_dir():
        pytest.skip("../shared/data/dreambench is not beside this checkout")
    return path


def mini_suite_data(**case_overrides) -> dict:
    """A valid two-case suite; tests break one field at a time."""
    single = {"id": "t-s-1", "kind": "single", "subjects": ["dog"], "prompt": "a dog riding a bicycle",
              "predicate": "riding", "boxes": [[0.1, 0.1, 0.9, 0.9]], "seed": 7}
    multi = {"id": "t-m-1", "kind": "multi", "subjects": ["dog", "bear"],
             "prompt": "a dog hugging a bear plushie", "predicate": "hugging",
             "boxes": [[0.05, 0.2, 0.6, 0.9], [0.4, 0.2, 0.95, 0.9]], "seed": 8}
    multi.update(case_overrides)
    return {
        "suite": "mini",
        "version": 1,
        "subjects": {"dog": {"class": "dog", "source": "dreambench", "dir": "dog"},
                     "bear": {"class": "bear plushie", "source": "dreambench", "dir": "bear_plushie"}},
        "cases": [single, multi],
    }


@pytest.fixture
def write_suite(tmp_path):
    def _write(data: dict, name: str = "mini.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


@pytest.fixture
def one_thread():
    """One torch thread: the tiny models are too small to gain from two, and on a shared
    2-core machine spinning thread pools make them several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

