"""The paper's tables (markdown, LaTeX) and a tidy csv, from `aggregate.summarize()` output.

One table per suite and score group: numbers from different protocols or encoders are not
comparable, so they never share a table, and best/second marks are only given within one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
from tabulate import tabulate

from ..errors import UserError
from ..metrics.protocols import PROTOCOLS
from ..runs import atomic_write_text
from .aggregate import ALL, GROUP, KINDS, METRICS, SUMMARY_COLUMNS, load_scores, summarize

METRIC_NAMES = {"clip_t": "CLIP-T", "clip_r": "CLIP-R", "clip_i": "CLIP-I", "dino": "DINO"}
MISSING_MD = "–"
MISSING_TEX = "--"
NO_SCORES = "No scores were found."


@dataclass(frozen=True)
class ColumnGroup:
    name: str
    kind: str
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    suite: str
    title: str
    groups: tuple[ColumnGroup, ...]

    @property
    def columns(self) -> list[tuple[ColumnGroup, str]]:
        return [(g, m) for g in self.groups for m in g.metrics]


_SINGLE = ColumnGroup("Single-object", "single", METRICS)
_MULTI = ColumnGroup("Multi-object", "multi", METRICS)
_NO_R = ("clip_t", "clip_i", "dino")  # tables without a CLIP-R column (leaderboard.csv has it)
TABLES = (
    Table("relationbench", "RelationBench (Table 1)", (_SINGLE, _MULTI)),
    Table("dreambench", "DreamBench (Table 2)", (ColumnGroup("Single-object", "single", _NO_R),)),
    Table("customconcept101-multi", "Multi-object CustomConcept101 (Table 3)",
          (ColumnGroup("Multi-object", "multi", _NO_R),)),
)


@dataclass(frozen=True)
class Cell:
    mean: str | None  # formatted; None when missing
    half: str | None  # formatted CI half-width; None when not asked for or undefined
    mark: str  # "best", "second" or ""


@dataclass(frozen=True)
class Section:
    """One table for one score group: rows are run labels, cells follow table.columns."""
    table: Table
    group: tuple[str, str, str]
    rows: list[tuple[str, list[Cell]]]
    n_cases: dict[str, str]  # column-group name -> cases per run ("20", or "18-20" when runs differ)


def _fmt(value: float, digits: int) -> str | None:
    return None if math.isnan(value) else f"{value:.{digits}f}"


def _marks(means: list[str | None]) -> list[str]:
    """Dense ranking on the printed values, so numbers that print the same share a mark."""
    ranked = sorted({float(m) for m in means if m is not None}, reverse=True)
    order = {v: ("best", "second")[i] for i, v in enumerate(ranked[:2])}
    return ["" if m is None else order.get(float(m), "") for m in means]


def _n_range(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _section(table: Table, group: tuple[str, str, str], df: pd.DataFrame, with_ci: bool,
             digits: int) -> Section:
    indexed = df.set_index(["run", "kind", "metric"])
    runs = sorted(df["run"].unique())
    columns = []
    for column_group, metric in table.columns:
        means, halves = [], []
        for run in runs:
            key = (run, column_group.kind, metric)
            row = indexed.loc[key] if key in indexed.index else None
            mean = None if row is None else _fmt(row["mean"], digits)
            means.append(mean)
            halves.append(_fmt((row["ci_high"] - row["ci_low"]) / 2, digits) if mean and with_ci else None)
        columns.append([Cell(m, h, k) for m, h, k in zip(means, halves, _marks(means))])
    rows = [(run, [col[i] for col in columns]) for i, run in enumerate(runs)]
    n_cases = {}
    for column_group in table.groups:
        scored = df[(df["kind"] == column_group.kind) & df["metric"].isin(column_group.metrics)]
        per_run = scored.groupby("run")["n_cases"].max()
        n_cases[column_group.name] = _n_range([int(v) for v in per_run]) if len(per_run) else "0"
    return Section(table, group, rows, n_cases)


def _sections(summary: pd.DataFrame, with_ci: bool, digits: int | None) -> list[Section]:
    sections = []
    for table in TABLES:
        rows = summary[summary["suite"] == table.suite]
        for group, group_rows in rows.groupby(list(GROUP), sort=True):
            protocol = PROTOCOLS.get(group[0])
            shown = digits if digits is not None else (protocol.digits if protocol else 3)
            sections.append(_section(table, group, group_rows, with_ci, shown))
    return sections


def _group_text(group: tuple[str, str, str]) -> str:
    protocol, clip, dino = group
    return f"protocol {protocol}, CLIP {clip}, DINO {dino}"


def _n_text(section: Section) -> str:
    return "; ".join(f"{name} {n}" for name, n in section.n_cases.items())


# -- markdown ---------------------------------------------------------------------------------
_MD_SPECIAL = "\\`*_[]<>|"


def _md_escape(text: str) -> str:
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text)


def _md_cell(cell: Cell) -> str:
    if cell.mean is None:
        return MISSING_MD
    mean = {"best": f"**{cell.mean}**", "second": f"<u>{cell.mean}</u>", "": cell.mean}[cell.mark]
    return mean if cell.half is None else f"{mean} ± {cell.half}"


def _markdown(sections: list[Section], empty_text: str) -> str:
    parts = ["# Leaderboard", ""]
    if not sections:
        return "\n".join([*parts, empty_text, ""])
    parts += ["Mean over cases (each case: mean over its images); higher is better. "
              "**Best** and <u>second</u> per column, within one table.", ""]
    for s in sections:
        protocol, clip, dino = s.group
        headers = ["Run"] + [f"{g.name} {METRIC_NAMES[m]}" for g, m in s.table.columns]
        body = [[_md_escape(run)] + [_md_cell(c) for c in cells] for run, cells in s.rows]
        parts += [
            f"## {s.table.title} — protocol `{protocol}`, CLIP `{clip}`, DINO `{dino}`", "",
            tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=("left",) + ("right",) * (len(headers) - 1)),
            "", f"n (cases per run): {_n_text(s)}", "",
        ]
    return "\n".join(parts)


# -- LaTeX ------------------------------------------------------------------------------------
_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in text)


def _tex_cell(cell: Cell) -> str:
    if cell.mean is None:
        return MISSING_TEX
    mean = {"best": rf"\textbf{{{cell.mean}}}", "second": rf"\underline{{{cell.mean}}}", "": cell.mean}[cell.mark]
    return mean if cell.half is None else rf"{mean} $\pm$ {cell.half}"


def _tex_table(s: Section) -> str:
    header, rules, start = [""], [], 2
    for g in s.table.groups:
        header.append(rf"\multicolumn{{{len(g.metrics)}}}{{c}}{{{tex_escape(g.name)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(g.metrics) - 1}}}")
        start += len(g.metrics)
    metrics = ["Run"] + [METRIC_NAMES[m] for _, m in s.table.columns]
    caption = f"{s.table.title}; {_group_text(s.group)}; n (cases per run): {_n_text(s)}."
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{tex_escape(caption)}}}",
        rf"\begin{{tabular}}{{l{'c' * len(s.table.columns)}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        " ".join(rules),
        " & ".join(metrics) + r" \\",
        r"\midrule",
        *(" & ".join([tex_escape(run)] + [_tex_cell(c) for c in cells]) + r" \\" for run, cells in s.rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines)


def _latex(sections: list[Section], empty_text: str) -> str:
    head = "% Leaderboard tables; needs \\usepackage{booktabs}. Higher is better; bold best, underlined second.\n"
    if not sections:
        return f"{head}% {empty_text}\n"
    return head + "\n\n".join(_tex_table(s) for s in sections) + "\n"


# -- csv --------------------------------------------------------------------------------------
def _sorted_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Long form in a fixed order: suite, group, run, then kinds and metrics in paper order."""
    kind_rank = {k: i for i, k in enumerate((*KINDS, ALL))}
    metric_rank = {m: i for i, m in enumerate(METRICS)}
    df = summary[list(SUMMARY_COLUMNS)].assign(
        _kind=summary["kind"].map(lambda k: kind_rank.get(k, len(kind_rank))),
        _metric=summary["metric"].map(lambda m: metric_rank.get(m, len(metric_rank))),
    )
    keys = ["suite", *GROUP, "run", "_kind", "kind", "_metric", "metric"]
    return df.sort_values(keys, kind="mergesort").drop(columns=["_kind", "_metric"]).reset_index(drop=True)


def leaderboard_dir(paths: Sequence[str | Path]) -> Path:
    """Where the leaderboard of `relbench score PATHS` goes without --leaderboard-dir: the given
    path that holds all the others (one path: that path, be it a run folder or a folder of runs).

    Never a folder above the paths (nothing is written outside what was given): when none of
    them holds the others, the user names the folder. Checked before anything is scored.
    """
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath(resolved))
    for given, path in zip(paths, resolved):
        if path == common:
            return Path(given)
    raise UserError(
        f"none of the {len(paths)} paths holds the others, so the leaderboard has no place among them",
        hint=f"pass --leaderboard-dir DIR (e.g. {common}), or give the one folder that holds the runs",
    )


def build_leaderboard(runs: Sequence[str | Path], out_dir: str | Path, n_boot: int = 1000, seed: int = 0,
                      with_ci: bool = False) -> list[Path]:
    """Summarize every row of the runs' scores.csv (old and new) and write the leaderboard files."""
    return write_leaderboard(summarize(load_scores(runs), n_boot=n_boot, seed=seed), out_dir, with_ci=with_ci)


def write_leaderboard(summary: pd.DataFrame, out_dir: str | Path, with_ci: bool = False,
                      digits: int | None = None) -> list[Path]:
    """Write leaderboard.md, .csv and .tex into out_dir (each atomically) and return their paths.

    digits: decimals shown; None: the protocol's own (1 on the 100x scale, 3 on raw cosines).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if summary.empty:
        summary = pd.DataFrame(columns=list(SUMMARY_COLUMNS))
        empty_text = NO_SCORES
    else:
        suites = ", ".join(t.suite for t in TABLES)
        empty_text = f"No scores for the suites with paper tables ({suites}); see leaderboard.csv."
    sections = _sections(summary, with_ci, digits)
    paths = [out_dir / "leaderboard.md", out_dir / "leaderboard.csv", out_dir / "leaderboard.tex"]
    texts = [
        _markdown(sections, empty_text),
        _sorted_summary(summary).to_csv(index=False, lineterminator="\n"),
        _latex(sections, empty_text),
    ]
    for path, text in zip(paths, texts):
        atomic_write_text(path, text)
    return paths
