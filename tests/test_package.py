"""The package as a user meets it: a light import, a working entry point, the method list."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from relationbench.cli import cli


def test_import_is_light():
    code = (
        "import sys, relationbench, relationbench.cli, relationbench.generate, relationbench.suites, "
        "relationbench.methods, relationbench.data, relationbench.runs, relationbench.backbones\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'spacy') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cli_help_and_methods():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    for command in ("generate", "prompts", "data", "methods"):
        assert command in res.output
    res = CliRunner().invoke(cli, ["methods"])
    assert res.exit_code == 0
    assert "relationbench.methods.sdxl:SDXLMethod" in res.output
