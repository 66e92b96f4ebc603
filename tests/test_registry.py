"""Method cards and the registry: lookup, errors, entry points, settings."""

from __future__ import annotations

import sys
import textwrap
from importlib import metadata

import pytest

from relationbench.errors import UserError
from relationbench.methods import Registry, default_registry, load_card


def test_builtin_cards_parse_and_import():
    reg = default_registry()
    assert "sdxl" in reg.names()
    for name in reg.names():
        card = reg.card(name)
        cls = card.adapter_class()
        assert hasattr(cls, "Settings") and hasattr(cls, "generate") and hasattr(cls, "prepare")


def test_unknown_method_suggests():
    with pytest.raises(UserError, match="did you mean sdxl"):
        default_registry().card("sdxll")


def test_card_errors(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("name: m\nadapter: relationbench.methods.sdxl:SDXLMethod\nsettings: {stepz: 3}\n")
    card = load_card(bad)
    with pytest.raises(UserError, match="unknown setting"):
        card.build(None)
    bad.write_text("name: m\nadapter: nowhere.module:Thing\n")
    with pytest.raises(UserError, match="cannot import adapter"):
        load_card(bad).adapter_class()
    bad.write_text("name: m\n")
    with pytest.raises(UserError, match="lacks adapter"):
        load_card(bad)


def test_digest_changes_with_settings(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("name: a\nadapter: relationbench.methods.sdxl:SDXLMethod\nsettings: {steps: 3}\n")
    b = tmp_path / "b.yaml"
    b.write_text("name: a\nadapter: relationbench.methods.sdxl:SDXLMethod\nsettings: {steps: 4}\n")
    assert load_card(a).digest() != load_card(b).digest()
    # a value equal to the default changes nothing: the digest is of the resolved settings
    c = tmp_path / "c.yaml"
    c.write_text("name: a\nadapter: relationbench.methods.sdxl:SDXLMethod\nsettings: {steps: 3, guidance_scale: 5.0}\n")
    assert load_card(a).digest() == load_card(c).digest()


def test_entry_point_method(tmp_path, monkeypatch):
    """A third-party package registers a card through the entry point group."""
    pkg = tmp_path / "thirdparty"
    pkg.mkdir()
    card = pkg / "mine.yaml"
    card.write_text("name: mine\nadapter: thirdparty:Mine\nsettings: {}\n")
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        from dataclasses import dataclass
        @dataclass
        class Settings: pass
        class Mine:
            Settings = Settings
            needs_references = False
            card_path = {str(card)!r}
            def __init__(self, settings, context): pass
            def prepare(self, cases): pass
            def generate(self, requests): return []
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = metadata.EntryPoint(name="mine", value="thirdparty:Mine", group="relationbench.methods")
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [ep] if group == "relationbench.methods" else [])
    reg = Registry()
    assert "mine" in reg.names() and "sdxl" in reg.names()
    assert reg.card("mine").adapter == "thirdparty:Mine"
    sys.modules.pop("thirdparty", None)


def test_duplicate_names_refused(tmp_path):
    d1, d2 = tmp_path / "a", tmp_path / "b"
    d1.mkdir(), d2.mkdir()
    for d in (d1, d2):
        (d / "same.yaml").write_text("name: same\nadapter: x:Y\n")
    with pytest.raises(UserError, match="defined twice"):
        Registry([d1, d2], use_entry_points=False).names()
