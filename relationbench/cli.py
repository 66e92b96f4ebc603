"""The `relbench` command. Thin: parse, call one function, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .devices import DTYPES
from .errors import UserError
from .metrics.models import CLIP_KEYS
from .metrics.protocols import PROTOCOLS


class _Failed(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    """Turns a UserError anywhere below into one message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise _Failed(exc.render()) from None


def _backbone_options(f):
    f = click.option("--weight", "weights", multiple=True, metavar="KEY=PATH_OR_ID",
                     help="Replace one weight source of the backbone (e.g. sdxl=/models/sdxl-base).")(f)
    f = click.option("--backbone", default="sdxl", show_default=True,
                     help="Model preset: sdxl (real weights) or tiny (offline toy models).")(f)
    return f


def _parse_pairs(pairs, what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise UserError(f"{what} {pair!r} must look like KEY=VALUE")
        out[key] = value
    return out


@click.group(cls=_Group)
@click.version_option(package_name="relationbench")
def cli():
    """relbench: benchmark relation-aware customized image generation."""


# -- prompts ------------------------------------------------------------------------------
@cli.group(cls=_Group)
def prompts():
    """Benchmark suites and their cases."""


@prompts.command("list")
def prompts_list():
    """Suites with their case counts."""
    from tabulate import tabulate

    from .suites import available_suites, load_suite

    rows = []
    for name in available_suites():
        suite = load_suite(name)
        counts = suite.counts()
        rows.append([name, suite.version, len(suite.cases), counts["single"], counts["multi"], len(suite.subjects),
                     suite.images_per_case])
    click.echo(tabulate(rows, headers=["suite", "version", "cases", "single", "multi", "subjects", "images/case"]))


@prompts.command("show")
@click.argument("case_id")
@click.option("--draw", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the case's layout (boxes and labels) into this PNG.")
def prompts_show(case_id, draw):
    """One case, found in any suite (YAML, for reading; `export` gives JSON)."""
    import yaml

    from .suites import available_suites, load_suite

    for name in available_suites():
        try:
            case = load_suite(name).case(case_id)
        except KeyError:
            continue
        click.echo(yaml.safe_dump(case.as_record(), sort_keys=False, default_flow_style=None, width=100).rstrip())
        if draw is not None:
            from .report.layouts import draw_layout

            draw_layout(case).save(draw)
            click.echo(f"layout drawn to {draw}")
        return
    raise UserError(f"no suite has a case {case_id!r}", hint="see `relbench prompts export --suite NAME`")


@prompts.command("export")
@click.option("--suite", required=True, help="Suite name or file.")
@click.option("--kind", type=click.Choice(["single", "multi"]), default=None)
def prompts_export(suite, kind):
    """Print the suite's cases, one JSON object per line."""
    from .suites import load_suite

    for case in load_suite(suite).cases:
        if kind is None or case.kind == kind:
            click.echo(json.dumps(case.as_record()))


@prompts.command("draw")
@click.option("--suite", required=True, help="Suite name or file.")
@click.option("--kind", type=click.Choice(["single", "multi"]), default=None)
@click.option("--limit", type=int, default=None, help="Only the first N cases.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG to write.")
def prompts_draw(suite, kind, limit, out):
    """A contact sheet of the suite's layouts, to check boxes by eye."""
    from .generate import select_cases
    from .report.layouts import layout_sheet
    from .suites import load_suite

    cases = select_cases(load_suite(suite), kind=kind, limit=limit)
    layout_sheet(cases).save(out)
    click.echo(f"{len(cases)} layouts drawn to {out}")


@prompts.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Name of the new suite (default: the stem of --out, else of FILE).")
@click.option("--map", "mapping", multiple=True, metavar="FIELD=COLUMN", help="Read FIELD from COLUMN.")
@click.option("--subjects-from", default="relationbench", show_default=True,
              help="Suite whose subject registry names the subjects (case lists).")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Authors' config: the folder its relative paths are relative to (default: the config's folder).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: prompts/NAME.yaml.")
@click.option("--force", is_flag=True, help="Replace an existing suite file.")
def prompts_import(file, name, mapping, subjects_from, image_root, out, force):
    """Turn a JSON/JSONL/CSV case list, or the RelationBooth authors' inference config (a YAML
    file with class_names, prompt, images_path, boxes), into a suite.

    Case-list fields: id, kind, subjects, prompt, predicate, predicate_source, boxes, seed; only
    prompt and subjects are required (defaults: ids from the name, kind from the subject count,
    predicate by spaCy, marked `predicate_source:` for review, standard boxes, seeds from the id).
    An authors' config becomes one case whose subjects' images are its images_path files.
    """
    from .suites import prompts_dir
    from .suites.importer import import_suite_file, write_suite

    name = (out or file).stem if name is None else name
    out = out or prompts_dir() / f"{name}.yaml"
    data, notes = import_suite_file(file, name, out, mapping=_parse_pairs(mapping, "--map"),
                                    subjects_from=subjects_from, image_root=image_root)
    write_suite(data, out, force=force)
    click.echo(f"wrote {len(data['cases'])} cases to {out}")
    for note in notes:
        click.echo(f"note: {note}")
    marked = [c for c in data["cases"] if "predicate_source" in c]
    if marked:
        click.echo(f"{len(marked)} predicate(s) extracted by a program, each marked `predicate_source:` for review: "
                   "check it against its prompt, correct it if needed, then delete the mark")


# -- data ---------------------------------------------------------------------------------
_DATASETS = click.Choice(["dreambench", "customconcept101"])
_data_dir = click.option("--data-dir", default=None, help="Subject image root (default: $RELBENCH_DATA or ~/.cache/relationbench/data).")


@cli.group(cls=_Group)
def data():
    """Subject images (fetch, import, verify, example-subjects) and relation triplets (check, example-triplets, import-triplets,
    synthesize, annotate, show)."""


@data.command("fetch")
@click.argument("name", type=_DATASETS)
@_data_dir
@click.option("--url", default=None, help="Download from this address instead.")
@click.option("--quiet", is_flag=True)
def data_fetch(name, data_dir, url, quiet):
    """Download the original subject images."""
    from . import data as datamod

    dest = datamod.fetch(name, datamod.data_root(data_dir), url=url, quiet=quiet)
    click.echo(f"{name}: ready in {dest}")


@data.command("import")
@click.argument("name", type=_DATASETS)
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@_data_dir
def data_import(name, src, data_dir):
    """Take a local copy (a folder or a zip) of a dataset's subject images."""
    from . import data as datamod

    dest = datamod.import_(name, src, datamod.data_root(data_dir))
    click.echo(f"{name}: ready in {dest}")


@data.command("verify")
@click.argument("name", type=_DATASETS)
@_data_dir
def data_verify(name, data_dir):
    """Re-check a dataset's files against its recorded checksums."""
    from . import data as datamod

    report = datamod.verify(name, datamod.data_root(data_dir))
    click.echo(str(report))
    if not report.ok:
        raise UserError(f"{name}: files differ from their recorded checksums", hint=f"fetch or import {name} again")


_relation_option = click.option("--relation", "relations", multiple=True, help="Only this relation (repeatable).")


@data.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@_relation_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_check(root, relations, quiet):
    """List every problem of a relation-triplet folder (exit 2 when any), else summarize it."""
    from .data.triplets import scan_triplets

    problems, found = scan_triplets(root, relations or None, quiet=quiet)
    if problems:
        click.echo("\n".join(map(str, problems)))
        raise UserError(f"{len(problems)} problem(s) in the relation triplets", path=root,
                        hint="fix each file named above (format: README, ## Relation triplets)")
    click.echo("\n".join(found.summary()))


@data.command("example-triplets")
@click.argument("out", type=click.Path(path_type=Path))
def data_example_triplets(out):
    """Write a small synthetic relation-triplet set (stick figures, two relations) into OUT."""
    from .data.example_triplets import write_example_triplets

    found = write_example_triplets(out)
    click.echo("\n".join(found.summary()) + f"\nwritten to {out}")


@data.command("example-subjects")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--suite", default="relationbench", show_default=True)
@click.option("--cases", multiple=True, help="Case ids (comma-separated, repeatable; default: every case).")
@click.option("--limit", type=int, default=None, help="Only the first N selected cases.")
def data_example_subjects(out, suite, cases, limit):
    """Write synthetic stand-ins for the subject images of a suite's cases into OUT (a data root
    for --data-dir; offline dry runs only: not the datasets' images)."""
    from .data.example_subjects import write_example_subjects
    from .generate import select_cases
    from .suites import load_suite

    chosen = select_cases(load_suite(suite), cases, None, limit)
    folders = write_example_subjects(out, [s for c in chosen for s in c.subjects])
    click.echo(f"{len(folders)} stand-in subject(s) written to {out} (use it with --data-dir; see {out}/NOTE.txt)")


@data.command("import-triplets")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@_relation_option
@click.option("--schema", default="ap10k-17", show_default=True, help="Keypoint schema of the source's keypoints.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_import_triplets(src, out, relations, schema, quiet):
    """Convert the RelationBooth authors' training data (DreamRelation layout) in SRC into OUT."""
    from .data.authors import import_authors_triplets

    found = import_authors_triplets(src, out, relations or None, schema=schema, quiet=quiet)
    click.echo("\n".join(found.summary()) + f"\nwritten to {out}")
    marked = sum(s.predicate_source is not None for samples in found.relations.values() for s in samples)
    if marked:
        click.echo(f"{marked} predicate(s) were extracted from their prompts and marked predicate_source: "
                   "check them in the triplets.json files, correct them if needed, then delete the mark")


def _annotator_options(f):
    """The annotation settings of `data annotate` and `data synthesize` (None: AnnotateSettings' default)."""
    f = click.option("--keypoint-annotator", default=None,
                     help="Entry point of relationbench.keypoint_annotators (default vitpose-plus).")(f)
    f = click.option("--mask-annotator", default=None,
                     help="Entry point of relationbench.mask_annotators (default owlv2-sam).")(f)
    f = click.option("--caption", is_flag=True,
                     help="Caption the target and each reference (OUT/<relation>/captions.json).")(f)
    f = click.option("--threshold", type=float, default=None, help="Detection score an object needs (default 0.3).")(f)
    return f


def _annotator_given(threshold, mask_annotator, keypoint_annotator) -> dict:
    """The annotation settings given on the command line (AnnotateSettings' fields; the rest keep their defaults)."""
    given = dict(threshold=threshold, mask_annotator=mask_annotator, keypoint_annotator=keypoint_annotator)
    return {k: v for k, v in given.items() if v is not None}


@data.command("annotate")
@click.argument("raw", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@_backbone_options
@_annotator_options
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_annotate(raw, out, backbone, weights, threshold, caption, mask_annotator, keypoint_annotator, device, quiet):
    """Annotate RAW (raw.json: targets, entities, predicates, prompts, references) into the
    relation-triplet folder OUT: masks, boxes, keypoints (and captions); samples whose detections
    do not match their entities are set aside in OUT/annotate-report.md."""
    from .data.annotate import annotate

    report = annotate(raw, out, backbone=backbone, weights=_parse_pairs(weights, "--weight"), device=device,
                      progress=not quiet, caption=caption,
                      **_annotator_given(threshold, mask_annotator, keypoint_annotator))
    click.echo("\n".join(report.summary()))
    if not report.kept:
        raise UserError(f"no sample was kept ({len(report.set_aside)} set aside, reasons above)",
                        path=out / "annotate-report.md",
                        hint="check the images and entity names, or lower --threshold")
    click.echo(f"written to {out}; check: relbench data check {out}")


@data.command("synthesize")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--relation", required=True, help="The relation's folder name, e.g. hug or shake_hands.")
@click.option("--entities", required=True, help='1 or 2 class nouns, comma-separated, e.g. "bear,tiger".')
@click.option("--predicate", default=None,
              help="The relation phrase of the prompts (default: from --relation, hug -> hugging).")
@click.option("--samples", type=int, default=6, show_default=True, help="Targets to make (paper: 4-6).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses seed + i.")
@click.option("--generator", default="sdxl", show_default=True,
              help="Text-to-image generator: an entry point of relationbench.image_generators.")
@click.option("--size", type=int, default=None, help="Image side in pixels (default: the backbone's).")
@click.option("--annotate/--no-annotate", default=True, show_default=True,
              help="Annotate OUT into OUT/triplets and check it.")
@_annotator_options
@_backbone_options
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def data_synthesize(out, relation, entities, predicate, samples, seed, generator, size, annotate, threshold, caption,
                    mask_annotator, keypoint_annotator, backbone, weights, device, dtype, quiet):
    """Make raw samples of a new relation in OUT (targets by a text-to-image generator, each entity
    found by the mask annotator, references by MS-Diffusion from its crop), then annotate them."""
    from .data.annotators import AnnotateSettings
    from .data.synthesize import SynthesizeOptions, SynthesizeSettings, synthesize

    summary = synthesize(SynthesizeOptions(
        out=out, relation=relation, entities=entities, predicate=predicate,
        settings=SynthesizeSettings(samples=samples, seed=seed, generator=generator, size=size), annotate=annotate,
        annotate_settings=AnnotateSettings(caption=caption,
                                           **_annotator_given(threshold, mask_annotator, keypoint_annotator)),
        backbone=backbone, weights=_parse_pairs(weights, "--weight"), device=device, dtype=dtype, quiet=quiet,
    ))
    click.echo(f"{summary.samples} raw sample(s) written to {summary.out} (raw.json, synthesis.json)")
    for sample_id, why in summary.set_aside:
        click.echo(f"set aside: sample {sample_id}: {why}", err=True)
    if summary.report is None:
        click.echo(f"next: relbench data annotate {summary.out} {summary.out}/triplets")
    else:
        click.echo("\n".join(summary.report.summary()))
        click.echo(f"annotated and checked: {summary.triplets}\n"
                   f"look at it: relbench data show {summary.triplets} --out sheet.png")


@data.command("show")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write.")
@_relation_option
@click.option("--max-samples", type=int, default=None, help="Rows on the sheet (default 32).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_show(root, out, relations, max_samples, quiet):
    """A contact sheet of a relation-triplet folder: masks, boxes and keypoints on every image."""
    from .data.show import MAX_SAMPLES, show_triplets

    summary = show_triplets(root, out, relations or None, MAX_SAMPLES if max_samples is None else max_samples,
                           quiet=quiet)
    more = f" ({summary.total - summary.shown} more not shown: --max-samples, --relation)" \
        if summary.total > summary.shown else ""
    click.echo(f"{summary.shown} sample(s) drawn to {summary.out}{more}")


# -- methods ------------------------------------------------------------------------------
_set_option = click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
                           help="Change one setting of the card (a variant, named e.g. msdiffusion[scale=0.4]).")


@cli.group("methods", cls=_Group, invoke_without_command=True)
@click.pass_context
def methods_group(ctx):
    """Method cards: list them, or show one's resolved settings."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(methods_list)


@methods_group.command("list")
def methods_list():
    """Registered method cards."""
    from tabulate import tabulate

    from .methods import default_registry

    reg = default_registry()
    rows = [[c.name, c.adapter, c.path] for c in (reg.card(n) for n in reg.names())]
    click.echo(tabulate(rows, headers=["method", "adapter", "card"]))


@methods_group.command("show")
@click.argument("name")
@_set_option
@click.option("--backbone", default="sdxl", show_default=True, help="tiny applies the card's smoke schedule.")
def methods_show(name, set_values, backbone):
    """A card's resolved settings and where each value came from."""
    from tabulate import tabulate

    from .backbones import get_backbone
    from .methods import default_registry
    from .methods.cards import parse_set

    card = default_registry().card(name, parse_set(set_values))
    resolved = card.resolve(get_backbone(backbone).is_tiny)
    click.echo(f"method:  {card.name}\nadapter: {card.adapter} (version {card.version})\ncard:    {card.path}")
    if card.base:
        click.echo(f"base:    {card.base}")
    rows = [[k, json.dumps(v, default=list), resolved.sources[k]] for k, v in resolved.values.items()]
    click.echo(tabulate(rows, headers=["setting", "value", "from"]))


# -- generate -----------------------------------------------------------------------------
@cli.command("generate")
@click.option("--method", required=True, help="Method card name (see `relbench methods`) or card file.")
@_set_option
@click.option("--suite", default="relationbench", show_default=True)
@_backbone_options
@click.option("--limit", type=int, default=None, help="Only the first N selected cases.")
@click.option("--cases", multiple=True, help="Case ids (comma-separated, repeatable).")
@click.option("--kind", type=click.Choice(["single", "multi"]), default=None)
@click.option("--images-per-case", type=int, default=None, help="Samples per case (default: the suite's, e.g. 4 for dreambench).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--out", default=None, help="Run folder (default: results/SUITE/METHOD[@BACKBONE]).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option("--batch-invariant/--no-batch-invariant", default=None,
              help="Pad small batches so batch size never changes an image's bytes (default: on for the CPU).")
@_data_dir
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate_cmd(method, set_values, suite, backbone, weights, limit, cases, kind, images_per_case, batch_size, out,
                 device, dtype, batch_invariant, data_dir, quiet):
    """Generate images for a suite; rerun to resume."""
    from .generate import GenerateOptions, generate

    summary = generate(GenerateOptions(
        method=method, set_values=set_values, suite=suite, backbone=backbone, weights=_parse_pairs(weights, "--weight"),
        limit=limit, cases=cases, kind=kind, images_per_case=images_per_case, batch_size=batch_size,
        out=out, device=device, dtype=dtype, data_dir=data_dir, quiet=quiet, batch_invariant=batch_invariant,
    ))
    replaced = f" ({len(summary.replaced)} replaced: {_listing(summary.replaced)})" if summary.replaced else ""
    click.echo(f"{summary.run_dir}: {summary.generated} generated{replaced}, {summary.skipped} already done "
               f"({summary.seconds:.1f} s)")
    if summary.dropped:
        click.echo(f"{len(summary.dropped)} image(s) of cases not selected now failed their check and left the "
                   f"manifest (made again when selected): {_listing(summary.dropped)}", err=True)


def _listing(items, limit: int = 5) -> str:
    """'a; b; c' for (path, why) pairs or paths, the first `limit` and how many more."""
    shown = [" ".join(item) if isinstance(item, tuple) else str(item) for item in items[:limit]]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(shown) + more


# -- train --------------------------------------------------------------------------------
@cli.command("train")
@click.option("--method", default="relationbooth", show_default=True, help="Method card (or card file) to train.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Relation-triplet folder.")
@click.option("--relation", "relations", multiple=True, help="Only this relation (repeatable; default: all).")
@click.option("--out", default=None, help="LoRA bank (default: the card's `bank`, else "
                                          "$RELBENCH_CACHE/relationbooth/loras).")
@_backbone_options
@_set_option
@click.option("--resume", is_flag=True, help="Continue interrupted trainings from their checkpoints.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_cmd(method, data, relations, out, backbone, weights, set_values, resume, device, dtype, quiet):
    """Train a LoRA per relation into a LoRA bank; rerun to skip what is trained."""
    from .train import TrainOptions, train

    summary = train(TrainOptions(
        data=data, method=method, relations=relations, out=out, backbone=backbone,
        weights=_parse_pairs(weights, "--weight"), set_values=set_values, device=device, dtype=dtype,
        resume=resume, quiet=quiet,
    ))
    if not summary.main:
        return
    for r in summary.results:
        loss = f"loss {r.first_loss:.4f} -> {r.last_loss:.4f} over {r.steps} steps" if r.steps else "no loss log"
        what = f"trained in {r.seconds:.1f} s" if r.trained else "already trained"
        click.echo(f"{r.relation}: {what} as {r.name} ({loss})")
    click.echo(f"bank: {summary.bank}")


@cli.command("train-local-encoder")
@click.option("--images", required=True, type=click.Path(path_type=Path),
              help="Folder of training images (the paper: COCO train2017).")
@_backbone_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: $RELBENCH_CACHE/relationbooth/local-encoder/BACKBONE).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: 6 epochs).")
@click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
              help="Change one distillation setting (e.g. trainable_blocks=24, max_split=4).")
@click.option("--resume", is_flag=True, help="Continue an interrupted distillation from its checkpoint.")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_local_encoder_cmd(images, backbone, weights, out, steps, set_values, resume, device, quiet):
    """Distil RelationBooth's local encoder with CLIPSelf (paper appendix 6.1)."""
    from .methods.relationbooth.clipself import train_local_encoder

    result = train_local_encoder(images, backbone=backbone, weights=_parse_pairs(weights, "--weight"), out=out,
                                 steps=steps, set_values=set_values, resume=resume, device=device, quiet=quiet)
    if not result.main:
        return
    loss = f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}" if result.first_loss is not None else "no steps"
    click.echo(f"{result.checkpoint}: {loss} over {result.steps} steps ({result.seconds:.1f} s)")
    if backbone != "tiny":
        click.echo(f"use it with --weight local_encoder={result.checkpoint}")


# -- ablate -------------------------------------------------------------------------------
@cli.command("ablate")
@click.option("--component", "components", multiple=True, metavar="NAME",
              help="Ablation component (repeatable, comma-separated): a name from --list, `all`, or a YAML file.")
@click.option("--list", "list_components", is_flag=True, help="List the components and their rows, then stop.")
@click.option("--suite", default="relationbench", show_default=True)
@_backbone_options
@_set_option
@click.option("--cases", multiple=True, help="Case ids (comma-separated, repeatable; default: every case).")
@click.option("--limit", type=int, default=None, help="Only the first N cases of each kind the component uses.")
@click.option("--images-per-case", type=int, default=None, help="Samples per case (default: the suite's).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Relation triplets to train the LoRAs the variants lack (tiny: example triplets by default).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results"), show_default=True,
              help="Results root: runs in OUT/SUITE/VARIANT, tables in OUT/ablations/SUITE/COMPONENT.")
@_data_dir
@click.option("--protocol", type=click.Choice(sorted(PROTOCOLS)), default="paper", show_default=True)
@click.option("--clip", "clip_arch", type=click.Choice(list(CLIP_KEYS)), default="ViT-B-32", show_default=True)
@click.option("--bootstrap", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option("--dry-run", is_flag=True, help="Show what would be trained, generated and scored, and what exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ablate_cmd(components, list_components, suite, backbone, weights, set_values, cases, limit, images_per_case,
               batch_size, data, out, data_dir, protocol, clip_arch, bootstrap, seed, device, dtype, dry_run, quiet):
    """Ablate a component (paper Tables 4-7): its variants trained, generated, scored, tabled; rerun to resume."""
    from tabulate import tabulate

    from .ablation import AblateOptions, ablate, component_names, load_component, status_rows

    if list_components:
        for name in component_names():
            c = load_component(name)
            rows = ", ".join(v.name + (" (reference)" if v.name == c.reference else "") for v in c.variants)
            click.echo(f"{name}: {c.title}{f' ({c.paper})' if c.paper else ''}; {'/'.join(c.kinds)}; {rows}")
        return
    summary = ablate(AblateOptions(
        components=components, suite=suite, backbone=backbone, weights=_parse_pairs(weights, "--weight"),
        set_values=set_values, cases=cases, limit=limit, images_per_case=images_per_case, batch_size=batch_size,
        data=data, out=out, data_dir=data_dir, device=device, dtype=dtype, protocol=protocol, clip=clip_arch,
        n_boot=bootstrap, seed=seed, dry_run=dry_run, quiet=quiet))
    if not summary.main:
        return
    if dry_run:
        click.echo(tabulate(status_rows(summary), headers=["run", "rows", "folder", "LoRAs", "images", "scored"]))
        click.echo(f"{summary.plan.per_case} image(s) per case; tables would go to "
                   + ", ".join(str(folder) for *_, folder in summary.plan.tables))
        return
    c = summary.counts
    click.echo(f"{len(summary.plan.runs)} run(s): {c.trained} LoRA(s) trained, {c.generated} image(s) generated, "
               f"{c.scored} scored ({summary.seconds:.1f} s)")
    for markdown in summary.tables.values():
        click.echo("\n" + markdown)
    click.echo("written: " + ", ".join(str(p) for p in summary.written if p.suffix in (".md", ".json")))


# -- convert ------------------------------------------------------------------------------
@cli.group(cls=_Group)
def convert():
    """Convert official checkpoints to safetensors."""


@convert.command("msdiffusion")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def convert_msdiffusion(src, dst, force):
    """MS-Diffusion's ms_adapter.bin (SRC) -> a safetensors file (DST); loads like the original."""
    from .methods.msdiffusion.checkpoint import convert as convert_checkpoint

    if dst.exists() and not force:
        raise UserError("the output file exists", path=dst, hint="pass --force to replace it, or another DST")
    n = convert_checkpoint(src, dst)
    click.echo(f"{n} tensors written to {dst}")


# -- lora ---------------------------------------------------------------------------------
@cli.group(cls=_Group)
def lora():
    """LoRA banks: folders of trained LoRAs with an index."""


@lora.command("list")
@click.argument("bank", type=click.Path(exists=True, file_okay=False, path_type=Path))
def lora_list(bank):
    """The LoRAs in BANK (e.g. ~/.cache/relationbench/dreambooth/loras)."""
    from tabulate import tabulate

    from .methods.lora.bank import LoraBank

    loras = LoraBank(bank)
    if not loras.index_path.is_file():
        raise UserError("not a LoRA bank: no index", path=loras.index_path,
                        hint="give a folder a method trained LoRAs into")
    entries = loras.entries()
    rows = [[e.name, e.file, e.rank, e.steps, e.base_model, e.created] for e in entries]
    click.echo(tabulate(rows, headers=["name", "file", "rank", "steps", "base model", "created"]))


@lora.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--relation", default=None,
              help="The relation one LoRA (SOURCE: its file or folder) is for; without it every folder under "
                   "SOURCE holding a pytorch_lora_weights.safetensors is one relation, named by the folder.")
@click.option("--bank", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="LoRA bank to add to (default: RelationBooth's, $RELBENCH_CACHE/relationbooth/loras).")
def lora_import(source, relation, bank):
    """Released RelationLoRAs (e.g. the authors', hub QingyuShi/DreamRelation) into a bank, checked first."""
    from tabulate import tabulate

    from .methods.lora.bank import LoraBank
    from .methods.relationbooth.lora import default_bank, import_loras

    loras = LoraBank(bank or default_bank())
    done = import_loras(source, loras, relation)
    rows = [[e.name, e.info.get("rank"), e.info.get("sha256", "")[:12], "added" if added else "already in the bank"]
            for e, added in done]
    click.echo(tabulate(rows, headers=["relation", "rank", "sha256", ""]))
    click.echo(f"bank: {loras.root}")


# -- score / compare -----------------------------------------------------------------------
@cli.command("score")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--metrics", "metric_names", default="clip_t,clip_r,clip_i,dino", show_default=True,
              help="Metrics to compute: `all` or names (see `relbench metrics`); the paper's four come together.")
@click.option("--protocol", type=click.Choice(sorted(PROTOCOLS)), default="paper", show_default=True,
              help="Metric convention; its name is written next to every score.")
@click.option("--clip", "clip_arch", type=click.Choice(list(CLIP_KEYS)), default="ViT-B-32", show_default=True,
              help="CLIP encoder of CLIP-T, CLIP-R and CLIP-I.")
@click.option("--backbone", default="auto", show_default=True,
              help="Encoder weights: auto (each run with its own backbone's: tiny runs tiny), sdxl or tiny.")
@click.option("--weight", "weights", multiple=True, metavar="KEY=PATH_OR_ID",
              help="Replace a scoring model's weights (clip, clip_l14, dino, vqa, detector).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="CLIP and DINO (also on grounded crops).")
@click.option("--model-dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="The VQAScore VLM and the detector: auto = bf16 on a GPU, fp32 on the CPU.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=None, help="Decoding processes (default: from device and cores).")
@click.option("--bootstrap", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Bootstrap resamples for the CIs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--ci", "with_ci", is_flag=True, help="Show ± the 95% CI half-width in the tables.")
@click.option("--leaderboard-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where leaderboard.{md,csv,tex} go (default: the one of PATHS that holds the others).")
@_data_dir
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score_cmd(paths, metric_names, protocol, clip_arch, backbone, weights, device, dtype, model_dtype, batch_size, workers, bootstrap, seed,
              with_ci, leaderboard_dir, data_dir, quiet):
    """Score every run below PATHS (scores.csv per run) and write the leaderboard; rerun to add new images.

    The leaderboard goes into PATHS itself (one path: that folder, even a single run folder;
    several: the one that holds the others), never above it; elsewhere with --leaderboard-dir.
    """
    from .report.leaderboard import build_leaderboard
    from .report.leaderboard import leaderboard_dir as default_leaderboard_dir
    from .score import ScoreOptions, score

    out = leaderboard_dir or default_leaderboard_dir(paths)  # refused here, before anything is written
    summary = score(ScoreOptions(
        paths=paths, metrics=metric_names, protocol=protocol, clip=clip_arch, backbone=backbone, weights=_parse_pairs(weights, "--weight"),
        device=device, dtype=dtype, model_dtype=model_dtype, batch_size=batch_size, workers=workers,
        data_dir=data_dir, quiet=quiet,
    ))
    written = build_leaderboard(summary.runs, out, n_boot=bootstrap, seed=seed, with_ci=with_ci)
    click.echo(f"{len(summary.runs)} run(s): {summary.scored} image(s) scored, {summary.skipped} already scored "
               f"({summary.seconds:.1f} s)")
    if summary.families:
        click.echo("scored per family: " + ", ".join(f"{f} {n}" for f, n in summary.families.items()))
    click.echo("leaderboard: " + ", ".join(str(p) for p in written))
    if summary.stale_rows:
        click.echo(f"dropped {summary.stale_rows} score row(s) whose image was regenerated or removed since it "
                   "was scored", err=True)
    for drift in summary.suite_drift:
        click.echo(f"warning: {drift.run}: the suite file {drift.current} differs from the copy the run was "
                   f"generated from ({drift.copy}); scored with the copy. Differs: {_listing(drift.changes)}",
                   err=True)
    if summary.constant_images:
        click.echo(f"warning: {len(summary.constant_images)} image(s) are one flat colour (all pixels equal, e.g. "
                   f"the black images of NaN latents), scored anyway: {_listing(summary.constant_images)}", err=True)
    if summary.missing_references:
        click.echo("no reference images, CLIP-I and DINO left empty for: " + "; ".join(summary.missing_references),
                   err=True)
    if summary.failures:
        click.echo(f"{len(summary.failures)} image(s) could not be scored:", err=True)
        for path, why in summary.failures:
            click.echo(f"  {path}: {why}", err=True)
        raise _Failed(f"{len(summary.failures)} image(s) not scored (listed above); the rest were")


@cli.command("compare")
@click.argument("run_a", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bootstrap", type=int, default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def compare_cmd(run_a, run_b, bootstrap, seed):
    """RUN_A minus RUN_B on the cases both scored: paired bootstrap 95% CI per metric, every
    metric both runs have (direction: which way is better)."""
    from tabulate import tabulate

    from .report.aggregate import compare_runs

    table = compare_runs(run_a, run_b, n_boot=bootstrap, seed=seed)
    click.echo(f"A = {run_a}\nB = {run_b}")
    click.echo(tabulate(table, headers="keys", showindex=False, floatfmt=".2f"))


@cli.command("report")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file (default: PATH/report.html); thumbnails and sheets go into <name>_files/ beside it.")
@_data_dir
@click.option("--embed", is_flag=True, help="Thumbnails inside the page as data URIs (one file; for small runs).")
@click.option("--sheets/--no-sheets", default=True, show_default=True, help="A PNG contact sheet per case.")
@click.option("--page-size", type=click.IntRange(min=1), default=20, show_default=True, help="Cases per gallery page.")
@click.option("--bootstrap", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Bootstrap resamples for the leaderboard's CIs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def report_cmd(path, out, data_dir, embed, sheets, page_size, bootstrap, quiet):
    """One HTML page for the runs (and ablations) below PATH: leaderboard, ablation tables and
    charts, and a gallery of every case with each run's samples and scores (filter, sort, worst
    cases; the view is in the URL). Needs no network."""
    from .report.html import ReportOptions, write_report

    done = write_report(ReportOptions(path=path, out=out, data_dir=data_dir, embed=embed, sheets=sheets,
                                      page_size=page_size, n_boot=bootstrap, quiet=quiet))
    for warning in done.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{done.page}: {done.runs} run(s), {done.cases} case(s), {done.images} image(s), "
               f"{done.ablations} ablation(s); {done.thumbnails_made} thumbnail(s) made, "
               f"{done.sheets} contact sheet(s) ({done.sheets_drawn} drawn)")


@cli.command("metrics")
def metrics_cmd():
    """Every metric `relbench score --metrics` knows: columns (↑ higher / ↓ lower is better),
    family (its file), models (weight keys) and what it measures."""
    from tabulate import tabulate

    from .metrics.registry import FAMILIES, METRICS, PAPER
    from .runs import FAMILY_SCORES

    rows = [[m.name, ", ".join(f"{c.name} {'↑' if c.direction == 'higher' else '↓'}" for c in m.columns if c.summary),
             m.family, ", ".join(m.models), m.description] for m in METRICS.values()]
    click.echo(tabulate(rows, headers=["metric", "columns", "family", "models", "measures"]))
    files = [f"{f} -> {'scores.csv (the four come together)' if f == PAPER else FAMILY_SCORES.format(family=f)}"
             for f in FAMILIES]
    click.echo("\nfamilies: " + ", ".join(files) + "; grounded also writes per-subject columns (_1, _2)")


def main(argv=None):
    from .generate import cpu_reproducible_env

    cpu_reproducible_env()  # before any GEMM of this process (see generate.py)
    cli.main(args=argv, prog_name="relbench")


if __name__ == "__main__":
    main(sys.argv[1:])
