"""A component -> card variants -> train / generate / score -> the paper-style ablation table:
what `relbench ablate` does.

A component is data: a YAML file in methods/ablations/ (or any path) naming a method card
and its variants, each a row label (the paper's wording) and the settings it changes:

    component: kml
    title: Keypoint matching loss
    paper: Table 4
    method: relationbooth
    reference: Full Model            # the row the others are compared with (paired bootstrap)
    kinds: [single, multi]
    metrics: [clip_t, clip_r, clip_i, dino]
    variants:
      - {name: w/o Keypoint Matching Loss, set: {kml_weight: 0}}
      - {name: Full Model, set: {}}

A variant is an ordinary card variant (`relationbooth[kml_weight=0]`), so its run is an
ordinary run folder, <out>/<suite>/<variant>[@<backbone>], which `relbench generate` with
the same --set would also use, and which two components with the same row share. Every
stage resumes: a LoRA is trained only when the bank lacks one with its settings (the bank's
key), an image only when the run lacks it, a score only when scores.csv lacks it; a stage
with nothing to do is not started. The tables are written from the runs' scores, limited
to the cases and samples this ablation selected, into <out>/ablations/<suite>/<component>[@<backbone>]/.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UserError
from .methods.cards import cards_dir, default_registry, parse_set
from .report.aggregate import KINDS
from .report.aggregate import METRICS as PAPER_METRICS
from .runs import atomic_write_text
from .suites import Case, load_suite

ABLATION_JSON = "ablation.json"
ALL = "all"
COMPONENT_KEYS = {"component", "title", "paper", "method", "reference", "kinds", "metrics", "variants"}


def components_dir() -> Path:
    """methods/ablations/: the components `--component NAME` finds."""
    return cards_dir() / "ablations"


@dataclass(frozen=True)
class Variant:
    name: str  # the table's row label, e.g. "w/o Keypoint Matching Loss"
    set: Mapping[str, Any]  # the settings it changes on the method card (empty: the card as it is)


@dataclass(frozen=True)
class Component:
    name: str
    title: str
    method: str  # a card name or card file
    reference: str  # the variant every other one is compared with
    variants: tuple[Variant, ...]
    kinds: tuple[str, ...] = KINDS
    metrics: tuple[str, ...] = PAPER_METRICS
    paper: str = ""  # where the paper reports it, e.g. "Table 4"
    path: Path | None = None


def component_names() -> list[str]:
    return sorted(p.stem for p in components_dir().glob("*.yaml"))


def load_component(name_or_path: str) -> Component:
    """A component by name (methods/ablations/NAME.yaml) or by YAML path, checked whole."""
    from .metrics.registry import column_spec
    from .userfiles import load_yaml, read_text

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = components_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown ablation component {name_or_path!r} (known: {', '.join(component_names())}, "
                            f"{ALL})", hint="give a name from `relbench ablate --list`, or a component YAML file")
    data = load_yaml(read_text(path), path)

    def bad(what: str) -> UserError:
        return UserError(f"ablation component: {what}", path=path,
                         hint="see methods/ablations/kml.yaml for the format")

    if not isinstance(data, dict):
        raise bad("the file must hold a mapping")
    unknown = sorted(set(data) - COMPONENT_KEYS)
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(COMPONENT_KEYS))})")
    for key in ("component", "title", "method", "reference"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise bad(f"`{key}` must be a non-empty text")
    raw = data.get("variants")
    if not isinstance(raw, list) or len(raw) < 2:
        raise bad("`variants` must list at least two rows")
    variants = []
    for n, v in enumerate(raw, 1):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or set(v) - {"name", "set"}:
            raise bad(f"variant {n} must be a mapping with `name` (text) and `set` (settings)")
        settings = v.get("set") or {}
        if not isinstance(settings, dict):
            raise bad(f"variant {v['name']!r}: `set` must be a mapping of settings")
        variants.append(Variant(v["name"], dict(settings)))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise bad("two variants share a name")
    if data["reference"] not in names:
        raise bad(f"reference {data['reference']!r} is not one of the variants ({', '.join(names)})")
    kinds = tuple(data.get("kinds") or KINDS)
    if not set(kinds) <= set(KINDS) or len(set(kinds)) != len(kinds):
        raise bad(f"`kinds` must be some of {', '.join(KINDS)}, got {list(kinds)}")
    metrics = tuple(data.get("metrics") or PAPER_METRICS)
    for metric in metrics:
        try:
            column_spec(metric)
        except KeyError:
            raise bad(f"unknown metric {metric!r} (see `relbench metrics`)") from None
    return Component(name=data["component"], title=data["title"], method=data["method"], reference=data["reference"],
                     variants=tuple(variants), kinds=kinds, metrics=metrics, paper=str(data.get("paper") or ""),
                     path=path)


def load_components(names: Sequence[str]) -> list[Component]:
    """The components named (ALL: every one in methods/ablations/), each once, in order."""
    wanted: list[str] = []
    for name in names:
        for part in (p.strip() for p in name.split(",")):
            if part:
                wanted += component_names() if part == ALL else [part]
    if not wanted:
        raise UserError("no ablation component given", hint=f"--component NAME (one of {', '.join(component_names())}, "
                                                             f"or {ALL})")
    return [load_component(n) for n in dict.fromkeys(wanted)]


def set_strings(values: Mapping[str, Any]) -> list[str]:
    """Settings -> `--set KEY=VALUE` texts that read back to the same values (YAML)."""
    out = []
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value) if not isinstance(value, float) else repr(value)
        out.append(f"{key}={text}")
    return out


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class AblateOptions:
    components: Sequence[str]  # names or YAML paths; "all"
    suite: str = "relationbench"
    backbone: str = "sdxl"
    weights: dict[str, str] = field(default_factory=dict)
    set_values: Sequence[str] = ()  # --set KEY=VALUE for every variant (a variant's own win)
    cases: Sequence[str] = ()
    limit: int | None = None  # the first N cases of each kind
    images_per_case: int | None = None  # None: the suite's
    batch_size: int = 1
    data: str | Path | None = None  # relation triplets to train lacking LoRAs on (tiny: example triplets)
    out: str | Path = "results"  # runs in OUT/<suite>/..., tables in OUT/ablations/<suite>/...
    data_dir: str | Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    protocol: str = "paper"
    clip: str = "ViT-B-32"
    n_boot: int = 1000
    seed: int = 0
    dry_run: bool = False
    quiet: bool = False


@dataclass
class Run:
    """One run folder the ablation needs, with the cases of every row that uses it."""
    method: str  # the component's card name or file
    card: Any  # MethodCard (the variant)
    set_values: list[str]
    run_dir: Path
    cases: list[Case]


@dataclass
class Row:
    variant: Variant
    run: Run


@dataclass
class Plan:
    suite: Any  # Suite
    per_case: int
    runs: dict[str, Run]  # card name -> run
    tables: list[tuple[Component, list[Row], list[Case], Path]]  # component, rows, its cases, its folder


def _select(suite, opts: AblateOptions, kinds: Sequence[str]) -> list[Case]:
    """The suite's cases (--cases, else all) of `kinds`, the first --limit of each kind."""
    from .generate import select_cases

    base = select_cases(suite, opts.cases)  # checks the ids
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"--limit must be at least 1, got {opts.limit}")
    chosen = {c.id for kind in kinds for c in [c for c in base if c.kind == kind][: opts.limit]}
    return [c for c in base if c.id in chosen]


def make_plan(opts: AblateOptions) -> Plan:
    """Every check, nothing written: the components, their variants as cards, the runs."""
    from .backbones import get_backbone
    from .generate import default_out

    components = load_components(opts.components)
    suite = load_suite(opts.suite)
    if (opts.images_per_case is not None and opts.images_per_case < 1) or opts.batch_size < 1:
        raise UserError("--images-per-case and --batch-size must be at least 1")
    per_case = opts.images_per_case or suite.images_per_case
    backbone = get_backbone(opts.backbone, opts.weights)
    registry = default_registry()
    common = parse_set(opts.set_values)
    runs: dict[str, Run] = {}
    tables = []
    for component in components:
        cases = _select(suite, opts, component.kinds)
        if not cases:
            raise UserError(f"component {component.name}: no {' or '.join(component.kinds)} case selected",
                            path=component.path, hint="check --cases and --limit")
        rows = []
        for variant in component.variants:
            strings = [*opts.set_values, *set_strings(variant.set)]
            try:
                card = registry.card(component.method, {**common, **parse_set(set_strings(variant.set))})
            except UserError as exc:
                raise UserError(f"component {component.name}, variant {variant.name!r}: {exc.message}",
                                path=component.path, hint=exc.hint) from None
            if card.name not in runs:
                folder = default_out(suite.name, card.name, backbone.name, opts.out)
                runs[card.name] = Run(component.method, card, strings, folder, [])
            run = runs[card.name]
            run.cases += [c for c in cases if c not in run.cases]
            rows.append(Row(variant, run))
        folder = default_out(suite.name, component.name, backbone.name, Path(opts.out) / "ablations")
        tables.append((component, rows, cases, folder))
    order = {c.id: i for i, c in enumerate(suite.cases)}
    for run in runs.values():
        run.cases.sort(key=lambda c: order[c.id])
    return Plan(suite, per_case, runs, tables)


# -- what exists ------------------------------------------------------------------------------
@dataclass
class RunStatus:
    images: int  # selected images the run holds
    total: int
    scored: int  # of them, scored with the ablation's protocol and encoders
    loras: "RowLoRAs | None"  # None: the method has no LoRA bank
    # ((case_id, index), its manifest's lora) of the images made with a LoRA the row may not use
    foreign: list[tuple[tuple[str, int], str | None]] = field(default_factory=list)


def _score_options(opts: AblateOptions, paths: Sequence[Path], metrics: Sequence[str]):
    from .score import ScoreOptions

    return ScoreOptions(paths=list(paths), metrics=",".join(metrics), protocol=opts.protocol, clip=opts.clip,
                        device=opts.device, data_dir=opts.data_dir, quiet=opts.quiet)


def data_hashes(plan: Plan, opts: AblateOptions) -> dict[str, str | None]:
    """relation -> the content hash of the data every row's LoRA must be trained on: --data's;
    on tiny without --data its example triplets' (None before they were first written: then
    nothing was trained on them); else None (data unknown, but the same for every row)."""
    from .data.triplets import load_triplets
    from .methods.relationbooth.selection import relation_key
    from .paths import cache_root

    relations = sorted({relation_key(c.relation) for run in plan.runs.values() for c in run.cases if c.relation})
    if not relations or not any(_bank_method(run) for run in plan.runs.values()):
        return {}
    if opts.data is not None:
        triplets = load_triplets(opts.data, relations)  # one error naming every relation it lacks
        return {r: triplets.content_hash(r) for r in relations}
    if opts.backbone != "tiny":
        return {r: None for r in relations}
    out = {}
    for r in relations:  # where data.example_triplets.cached_example_triplets writes them
        folder = cache_root() / "relationbooth" / "example-triplets" / r
        out[r] = load_triplets(folder, [r]).content_hash(r) if (folder / r / "triplets.json").is_file() else None
    return out


def _bank_method(run: Run) -> bool:
    from .methods.relationbooth.selection import RelationLoRASampling

    return issubclass(run.card.adapter_class(), RelationLoRASampling)


def run_status(run: Run, plan: Plan, opts: AblateOptions, metrics: Sequence[str],
               hashes: Mapping[str, str | None]) -> RunStatus:
    """What the run folder and the LoRA bank hold of what this ablation needs (reads only)."""
    from .methods.relationbooth.selection import relation_key
    from .runs import RunDir
    from .score import scored_images

    wanted = {(c.id, k) for c in run.cases for k in range(plan.per_case)}
    folder = RunDir(run.run_dir)
    have = folder.finished() & wanted
    scored = (scored_images(run.run_dir, _score_options(opts, [run.run_dir], metrics)) & have
              if folder.is_run() else set())
    loras = RowLoRAs.of(run, opts, hashes)
    foreign = []
    if loras is not None:
        relation = {c.id: relation_key(c.relation) for c in run.cases}
        latest = folder.latest()
        foreign = sorted((key, latest[key].get("lora")) for key in have
                         if latest[key].get("lora") not in loras.allowed.get(relation[key[0]], ()))
    return RunStatus(len(have), len(wanted), len(scored), loras, foreign)


@dataclass
class RowLoRAs:
    """The LoRAs one row may sample with, per relation: trained with the row's settings (their
    digest) on the ablation's data (its hash, when known). Stricter than sampling's choice,
    which may take an imported LoRA (its training settings unknown) or one trained on other
    data: the rows would then differ in more than the setting ablated."""

    allowed: dict[str, set[str]]  # relation -> names
    newest: dict[str, str | None]  # relation -> the newest allowed (None: lacking)
    sampled: dict[str, str | None]  # relation -> what sampling would take now (selection.find)
    data: dict[str, str | None]  # relation -> the data hash of `newest` (None: lacking or unrecorded)

    @classmethod
    def of(cls, run: Run, opts: AblateOptions, hashes: Mapping[str, str | None]) -> "RowLoRAs | None":
        """None for a method without a LoRA bank."""
        import torch

        from .backbones import get_backbone
        from .data import data_root
        from .methods import Context
        from .methods.relationbooth.selection import relation_key

        if not _bank_method(run):
            return None
        backbone = get_backbone(opts.backbone, opts.weights)
        method = run.card.build(Context(backbone=backbone, device="cpu", dtype=torch.float32,
                                        data_root=data_root(opts.data_dir), quiet=True))
        selection = method.selection()
        known_data = opts.data is not None or opts.backbone == "tiny"
        allowed, newest, sampled, data = {}, {}, {}, {}
        for relation in sorted({relation_key(c.relation) for c in run.cases if c.relation}):
            entries = [e for e in selection.candidates(relation) if e.info.get("settings_digest") == selection.digest
                       and (not known_data or e.info.get("data_sha256") == hashes.get(relation))]
            allowed[relation] = {e.name for e in entries}
            best = max(entries, key=lambda e: (e.created, e.name)) if entries else None
            newest[relation] = best.name if best else None
            data[relation] = best.info.get("data_sha256") if best else None
            sampled[relation] = selection.find(relation)
        return cls(allowed, newest, sampled, data)

    @property
    def lacking(self) -> list[str]:
        return [r for r, name in self.newest.items() if name is None]


# -- doing it ---------------------------------------------------------------------------------
@dataclass
class StageCounts:
    trained: int = 0  # LoRAs
    generated: int = 0  # images
    scored: int = 0  # images


@dataclass
class AblateSummary:
    plan: Plan
    status: dict[str, RunStatus]  # card name -> before anything ran
    counts: StageCounts
    written: list[Path]
    tables: dict[str, str]  # component -> its markdown table
    seconds: float
    main: bool = True


def ablate(opts: AblateOptions) -> AblateSummary:
    """Plan, then per run: train what the bank lacks, generate what the run lacks, score what
    is unscored; then write each component's table, charts and paired comparison. With
    `dry_run`, only the plan and what exists. Refuses, before any work, a row whose images
    were made with a LoRA it may not use (RowLoRAs), and rows whose LoRAs come from
    different data."""
    from .generate import Shard

    start = time.perf_counter()
    plan = make_plan(opts)
    metrics = list(dict.fromkeys(m for component, *_ in plan.tables for m in component.metrics))
    hashes = data_hashes(plan, opts)
    status = {name: run_status(run, plan, opts, metrics, hashes) for name, run in plan.runs.items()}
    counts = StageCounts()
    if opts.dry_run:
        return AblateSummary(plan, status, counts, [], {}, time.perf_counter() - start)
    _check_before(plan, status, opts)
    shard = Shard()
    for name, run in plan.runs.items():
        s = shard.share(status[name])
        if s.loras is not None and s.loras.lacking:
            counts.trained += _train(run, opts, s.loras.lacking)
            hashes = data_hashes(plan, opts)  # tiny: the example triplets exist now
        if s.images < s.total:
            if s.loras is not None:
                _check_sampling(run, RowLoRAs.of(run, opts, hashes))
            counts.generated += _generate(run, plan, opts)
        shard.barrier()
        after = shard.share(run_status(run, plan, opts, metrics, hashes) if shard.main else None)
        if after.foreign:  # made now with another LoRA: never scored or tabled (every process stops)
            raise _foreign_error({name: after})
        if shard.main and after.scored < s.total:
            counts.scored += _score(run, opts, metrics)
        shard.barrier()
    written, tables = [], {}
    if shard.main:
        for component, rows, cases, folder in plan.tables:
            paths, markdown = write_ablation(component, rows, cases, plan, folder, opts)
            written += paths
            tables[component.name] = markdown
    return AblateSummary(plan, status, counts, written, tables, time.perf_counter() - start, main=shard.main)


def _check_before(plan: Plan, status: Mapping[str, RunStatus], opts: AblateOptions) -> None:
    """The refusals that need no work: images made with a LoRA a row may not use; LoRAs that
    are lacking with nothing to train them on; rows whose LoRAs were trained on different data
    (possible only when the data is not given)."""
    if any(s.foreign for s in status.values()):
        raise _foreign_error({name: s for name, s in status.items() if s.foreign})
    rows = {name: s.loras for name, s in status.items() if s.loras is not None}
    lacking = {name: loras.lacking for name, loras in rows.items() if loras.lacking}
    if lacking and opts.data is None and opts.backbone != "tiny":
        listing = "; ".join(f"{name}: {', '.join(rel)}" for name, rel in lacking.items())
        raise UserError(f"the LoRA bank lacks RelationLoRAs trained with these variants' settings ({listing})",
                        hint="pass --data DIR (relation triplets): every row's LoRAs are trained on the same data "
                             "with the row's own settings (imported LoRAs, whose settings are unknown, are not used)")
    relations = sorted({r for loras in rows.values() for r in loras.newest})
    for relation in relations:
        data = {name: loras.data.get(relation) for name, loras in rows.items() if loras.newest.get(relation)}
        if len(set(data.values())) > 1:
            listing = "; ".join(f"{name}: {h[:12] if h else 'unrecorded'}" for name, h in data.items())
            raise UserError(f"the rows' LoRAs for {relation!r} were trained on different data ({listing}): the rows "
                            "would differ in more than the setting ablated",
                            hint="pass --data DIR: every row's LoRAs are then those trained on that data")


def _check_sampling(run: Run, loras: "RowLoRAs") -> None:
    """Sampling takes the bank's newest LoRA with the row's settings: it must be one the row may use."""
    wrong = {r: name for r, name in loras.sampled.items() if name not in loras.allowed.get(r, ())}
    if wrong:
        listing = ", ".join(f"{r} -> {name}" for r, name in wrong.items())
        raise UserError(f"{run.card.name} would sample with LoRAs not trained on the ablation's data ({listing}): "
                        "the bank holds newer LoRAs with these settings trained on other data",
                        hint="give the ablation a bank of its own: --set bank=DIR")


def _foreign_error(status: Mapping[str, RunStatus]) -> UserError:
    parts = []
    for name, s in status.items():
        (case, index), lora = s.foreign[0]
        parts.append(f"{name}: {len(s.foreign)} image(s), e.g. {case} sample {index} made with "
                     f"{lora or 'the base model'}")
    return UserError("images of these rows were made with LoRAs the rows may not use (imported, trained with other "
                     f"settings or on other data): {'; '.join(parts)}",
                     hint="give the ablation its own results root (--out DIR), or remove those runs")


def _train(run: Run, opts: AblateOptions, relations: Sequence[str]) -> int:
    """Train the run's lacking LoRAs on --data, or (tiny, no data) each on its example
    triplets, the data the tiny backbone's own LoRAs train on; returns how many trained."""
    from .data.example_triplets import cached_example_triplets
    from .train import TrainOptions, train

    if opts.data is not None:
        sources = [(opts.data, list(relations))]
    else:
        sources = [(cached_example_triplets(r), [r]) for r in relations]
    trained = 0
    for data, names in sources:
        summary = train(TrainOptions(data=data, method=run.method, relations=names, backbone=opts.backbone,
                                     weights=opts.weights, set_values=run.set_values, device=opts.device,
                                     dtype=opts.dtype, resume=True, quiet=opts.quiet))
        trained += len(summary.trained)
    return trained


def _generate(run: Run, plan: Plan, opts: AblateOptions) -> int:
    from .generate import GenerateOptions, generate

    summary = generate(GenerateOptions(
        method=run.method, set_values=run.set_values,
        suite=opts.suite, backbone=opts.backbone, weights=opts.weights, cases=[c.id for c in run.cases],
        images_per_case=plan.per_case, batch_size=opts.batch_size, out=str(run.run_dir), device=opts.device,
        dtype=opts.dtype, data_dir=opts.data_dir, quiet=opts.quiet))
    return summary.generated


def _score(run: Run, opts: AblateOptions, metrics: Sequence[str]) -> int:
    from .score import score

    summary = score(_score_options(opts, [run.run_dir], metrics))
    if summary.failures:
        path, why = summary.failures[0]
        raise UserError(f"{len(summary.failures)} image(s) of {run.run_dir} could not be scored (e.g. {why})",
                        path=Path(path), hint="regenerate or remove them, then rerun `relbench ablate`")
    return summary.scored


# -- the tables -------------------------------------------------------------------------------
def write_ablation(component: Component, rows: Sequence[Row], cases: Sequence[Case], plan: Plan, folder: Path,
                   opts: AblateOptions) -> tuple[list[Path], str]:
    """table.{md,csv,tex}, paired.{md,csv}, charts/<metric>.{png,svg} and ablation.json into
    `folder`, from the rows' scores of `cases` (samples 0 .. per_case - 1). Returns the files
    and the markdown table."""
    from .report.ablation_tables import ablation_frames, paired_markdown, table_latex, table_markdown
    from .report.charts import bar_chart
    from .score import ScoreIds

    ids = ScoreIds(_score_options(opts, [], component.metrics))
    table, paired, digits = ablation_frames(component, rows, cases, plan.per_case, opts, ids)
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{component.title}" + (f" (paper {component.paper})" if component.paper else "")
    markdown = table_markdown(component, table, digits, title)
    files = {
        "table.md": markdown + "\n" + paired_markdown(component, paired, digits),
        "table.csv": table.to_csv(index=False, lineterminator="\n"),
        "table.tex": table_latex(component, table, digits, title),
        "paired.csv": paired.to_csv(index=False, lineterminator="\n"),
    }
    written = []
    for name, text in files.items():
        atomic_write_text(folder / name, text)
        written.append(folder / name)
    for metric in component.metrics:
        written += bar_chart(table[table["metric"] == metric], metric, [v.name for v in component.variants],
                             folder / "charts" / metric, title=title)
    meta = {
        "component": component.name, "title": component.title, "paper": component.paper,
        "component_file": str(component.path) if component.path else None,
        "suite": plan.suite.name, "backbone": opts.backbone, "method": component.method,
        "reference": component.reference, "kinds": list(component.kinds), "metrics": list(component.metrics),
        "cases": [c.id for c in cases], "images_per_case": plan.per_case,
        "protocol": opts.protocol, "clip": opts.clip, "bootstrap": opts.n_boot, "seed": opts.seed,
        "variants": [{"name": r.variant.name, "set": dict(r.variant.set), "card": r.run.card.name,
                      "run_dir": _relative(r.run.run_dir, folder), "run": _run_label(r.run.run_dir)} for r in rows],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(folder / ABLATION_JSON, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    written.append(folder / ABLATION_JSON)
    return written, markdown


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _run_label(run_dir: Path) -> str:
    from .report.aggregate import run_label

    return run_label(run_dir) if Path(run_dir).is_dir() else Path(run_dir).name


def status_rows(summary: AblateSummary) -> list[list[str]]:
    """The dry-run listing: per run, what it is for and what exists of each stage."""
    uses: dict[str, list[str]] = {}
    for component, rows, _, _ in summary.plan.tables:
        for row in rows:
            uses.setdefault(row.run.card.name, []).append(f"{component.name}: {row.variant.name}")
    out = []
    for name, run in summary.plan.runs.items():
        s = summary.status[name]
        if s.loras is None:
            train = "–"
        else:
            lacking = s.loras.lacking
            train = (f"{len(s.loras.newest) - len(lacking)}/{len(s.loras.newest)} in bank"
                     + (f"; to train: {', '.join(lacking)}" if lacking else ""))
        images = f"{s.images}/{s.total}" + (f" ({len(s.foreign)} with other LoRAs)" if s.foreign else "")
        out.append([name, "; ".join(uses[name]), str(run.run_dir), train, images, f"{s.scored}/{s.total}"])
    return out
