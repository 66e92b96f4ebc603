"""Card variants: --set, `base:` cards, the tiny schedule, resolved settings and their sources."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.methods import default_registry, load_card
from relationbench.methods.cards import parse_set, variant_name
from relationbench.methods.msdiffusion import MSDiffusionSettings


def test_set_makes_a_named_variant_with_typed_values():
    card = default_registry().card("msdiffusion", parse_set(["scale=0.4", "steps=20", "subject_scales=[0.6, 0.4]"]))
    assert card.name == "msdiffusion[scale=0.4,steps=20,subject_scales=[0.6;0.4]]"
    assert card.base == "msdiffusion"
    resolved = card.resolve()
    assert resolved.values["scale"] == 0.4 and resolved.values["steps"] == 20
    assert resolved.values["subject_scales"] == (0.6, 0.4)
    assert resolved.sources["scale"] == "--set" and resolved.sources["guidance_scale"] == "card msdiffusion.yaml"
    # every field of the Settings class is resolved, nothing else
    assert set(resolved.values) == set(MSDiffusionSettings.__dataclass_fields__)


def test_variant_identity_differs_from_base():
    reg = default_registry()
    base, variant = reg.card("msdiffusion"), reg.card("msdiffusion", parse_set(["scale=0.4"]))
    assert base.digest() != variant.digest()
    assert base.describe()["settings"]["scale"] == 0.6 and variant.describe()["settings"]["scale"] == 0.4
    assert variant.describe()["changes"] == {"scale": 0.4}
    # what run.json stores reads back equal (tuples as lists), so a rerun is the same run
    scaled = reg.card("msdiffusion", parse_set(["subject_scales=[0.6, 0.4]"])).describe()
    assert json.loads(json.dumps(scaled)) == scaled and scaled["settings"]["subject_scales"] == [0.6, 0.4]
    # setting a value to what the card already says still names the variant, same images
    same = reg.card("msdiffusion", parse_set(["scale=0.6"]))
    assert same.digest() == base.digest() and same.name == "msdiffusion[scale=0.6]"


@pytest.mark.parametrize("pair,match", [
    ("scal=0.4", r"(?s)unknown setting\(s\) scal .*did you mean scale"),
    ("steps=abc", "setting steps must be int, got 'abc'"),
    ("steps=2.5", "setting steps must be int"),
    ("offload_image_encoder=maybe", "must be bool"),
    ("subject_scales=[0.6, x]", "setting subject_scales must be"),
    ("scale", "must look like KEY=VALUE"),
])
def test_bad_set_values_refused(pair, match):
    with pytest.raises(UserError, match=match):
        default_registry().card("msdiffusion", parse_set([pair]))


def test_text_settings_keep_what_was_typed():
    card = default_registry().card("sdxl", parse_set(["negative_prompt=blurry, 3d", "prompt_prefix=", "height=null"]))
    values = card.resolve().values
    assert values["negative_prompt"] == "blurry, 3d" and values["prompt_prefix"] == "" and values["height"] is None
    # a number typed for a text setting stays text
    assert default_registry().card("sdxl", parse_set(["negative_prompt=42"])).resolve().values["negative_prompt"] == "42"


def test_base_card_file(tmp_path):
    f = tmp_path / "low.yaml"
    f.write_text("base: msdiffusion\nsettings: {scale: 0.4, guidance_scale: 5}\n")
    card = load_card(f)
    assert card.name == "msdiffusion[guidance_scale=5.0,scale=0.4]"
    assert card.adapter == default_registry().card("msdiffusion").adapter
    resolved = card.resolve()
    assert resolved.values["guidance_scale"] == 5.0 and isinstance(resolved.values["guidance_scale"], float)
    assert resolved.sources["scale"] == "card low.yaml"
    # a named variant of a variant file, then --set on top: one bracket, later wins
    g = tmp_path / "lower.yaml"
    g.write_text("base: low.yaml\nname: ms-lower\nsettings: {scale: 0.3}\n")
    lower = load_card(g)
    assert lower.name == "ms-lower" and lower.base == "msdiffusion"
    assert lower.resolve().values["scale"] == 0.3 and lower.resolve().values["guidance_scale"] == 5.0
    assert variant_name("msdiffusion[scale=0.4]", {"scale": 0.2, "steps": 3}) == "msdiffusion[scale=0.2,steps=3]"


def test_base_card_errors(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("base: msdiffusion\nsettings: {scal: 0.4}\n")
    with pytest.raises(UserError, match="did you mean scale"):
        load_card(f)
    f.write_text("base: msdifusion\n")
    with pytest.raises(UserError, match="did you mean msdiffusion"):
        load_card(f)
    f.write_text("base: msdiffusion\nadapter: x:Y\n")
    with pytest.raises(UserError, match="names its base, not an adapter"):
        load_card(f)


def test_tiny_schedule_applies_on_tiny_only_and_yields_to_user_changes(tmp_path):
    f = tmp_path / "trainer.yaml"
    f.write_text("name: trainer\nadapter: relationbench.methods.sdxl:SDXLMethod\n"
                 "settings: {steps: 30, guidance_scale: 7.0}\ntiny: {steps: 2}\n")
    card = load_card(f)
    assert card.resolve(tiny=False).values["steps"] == 30
    tiny = card.resolve(tiny=True)
    assert tiny.values["steps"] == 2 and tiny.sources["steps"] == "tiny schedule"
    assert tiny.tiny_applied == {"steps": 2} and card.describe(tiny=True)["tiny_schedule"] == {"steps": 2}
    assert "tiny_schedule" not in card.describe(tiny=False)
    # the user's explicit value beats the smoke schedule
    explicit = card.with_settings(parse_set(["steps=5"]))
    assert explicit.resolve(tiny=True).values["steps"] == 5 and explicit.resolve(tiny=True).tiny_applied == {}


def test_methods_show_cli():
    res = CliRunner().invoke(cli, ["methods", "show", "msdiffusion", "--set", "scale=0.4"])
    assert res.exit_code == 0, res.output
    assert "msdiffusion[scale=0.4]" in res.output
    row = next(line for line in res.output.splitlines() if line.startswith("scale "))
    assert row.split()[1:] == ["0.4", "--set"]
    row = next(line for line in res.output.splitlines() if line.startswith("steps "))
    assert row.split()[1:] == ["30", "card", "msdiffusion.yaml"]
    res = CliRunner().invoke(cli, ["methods", "show", "msdiffusion", "--set", "scal=1"])
    assert res.exit_code == 2 and "did you mean scale" in res.output


def test_variant_runs_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--method", "sdxl", "--backbone", "tiny", "--cases", "rb-s-001", "--images-per-case", "1",
            "--quiet"]
    res = CliRunner().invoke(cli, [*args, "--set", "steps=2"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "results" / "relationbench" / "sdxl[steps=2]@tiny"
    meta = json.loads((run / "run.json").read_text())
    assert meta["method"]["name"] == "sdxl[steps=2]" and meta["method"]["settings"]["steps"] == 2
    assert meta["method"]["base"] == "sdxl" and meta["method"]["changes"] == {"steps": 2}
    # the same variant again resumes its run (run.json's identity reads back equal)
    res = CliRunner().invoke(cli, [*args, "--set", "steps=2"])
    assert res.exit_code == 0 and "0 generated, 1 already done" in res.output, res.output
    # another value is another run: its own folder, never mixed into this one
    res = CliRunner().invoke(cli, [*args, "--set", "steps=1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "results" / "relationbench" / "sdxl[steps=1]@tiny" / "run.json").is_file()
    # forcing both into one folder is refused as a different run
    res = CliRunner().invoke(cli, [*args, "--set", "steps=1", "--out", str(run)])
    assert res.exit_code == 2 and "differs in: method" in res.output


SHARED_NAMES = {"steps", "guidance_scale", "negative_prompt", "prompt_prefix", "height", "width"}


@pytest.mark.parametrize("name", default_registry().names())
def test_every_card_uses_the_shared_setting_names(name):
    """One name per concept across methods, so `--set steps=20` means the same everywhere."""
    fields = set(default_registry().card(name).settings_class().__dataclass_fields__)
    assert SHARED_NAMES <= fields, sorted(SHARED_NAMES - fields)


def test_dreambooth_trains_a_smoke_schedule_on_tiny():
    """`generate --method dreambooth --backbone tiny` took 11 minutes (100 class images, 500
    steps); on tiny the card's schedule cuts it to seconds, on sdxl the recipe stays."""
    card = default_registry().card("dreambooth")
    tiny, real = card.resolve(tiny=True).values, card.resolve(tiny=False).values
    assert tiny["train_steps"] * tiny["gradient_accumulation"] <= 4
    assert tiny["num_class_images"] <= 4 and tiny["class_steps"] <= 4
    assert (real["train_steps"], real["num_class_images"], real["gradient_accumulation"]) == (500, 100, 4)


def test_exponent_floats_without_a_dot_are_floats():
    """PyYAML (YAML 1.1) reads 1e-3 as text: a float setting takes it as the number it is
    (the paper's lambda values 1e-2 / 1e-3 / 1e-4), and text stays refused."""
    from relationbench.methods import default_registry
    from relationbench.methods.cards import parse_set

    card = default_registry().card("relationbooth", parse_set(["kml_weight=1e-2", "learning_rate=5E-4"]))
    values = card.resolve(False).values
    assert values["kml_weight"] == 0.01 and values["learning_rate"] == 0.0005
    with pytest.raises(UserError, match="kml_weight must be float"):
        default_registry().card("relationbooth", parse_set(["kml_weight=1e"])).resolve(False)
