"""An ablation's numbers and its paper-style tables (markdown, LaTeX), from its rows' scores.

Rows are the component's variants in its order (the paper puts the full model last);
columns are kind x metric, each cell the mean over cases with its 95% bootstrap interval.
Only the cases and samples the ablation selected count, and only scores of its score group
(protocol and encoders, or a family's model), so a run another command extended with more
cases, or scored with another encoder, changes nothing here. Each row is also compared with
the reference row case by case (aggregate.compare: the paired bootstrap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import pandas as pd
from tabulate import tabulate

from ..metrics.registry import PAPER, column_metric, column_spec
from ..runs import FAMILY_GROUP, SCORE_GROUP
from .aggregate import KIND_TITLES, compare, load_scores, summarize
from .gallery import digits as column_digits
from .leaderboard import Cell, _fmt, _marks, _md_cell, _tex_tabular, tex_escape

if TYPE_CHECKING:
    from ..ablation import AblateOptions, Component, Row
    from ..score import ScoreIds
    from ..suites import Case

TABLE_COLUMNS = ("variant", "run", "kind", "metric", "mean", "ci_low", "ci_high", "n_cases", "n_images")
PAIRED_COLUMNS = ("variant", "reference", "kind", "metric", "n_cases", "mean_variant", "mean_reference", "diff",
                  "ci_low", "ci_high")


def _family(metric: str) -> str:
    return column_metric(metric)[0].family


def _scores(run_dir, family: str, group: tuple[str, ...], cases: set[str], per_case: int) -> pd.DataFrame:
    """The run's rows of `family` in the ablation's score group, cases and samples."""
    df = load_scores([run_dir], family)
    columns = list(SCORE_GROUP if family == PAPER else FAMILY_GROUP)
    keep = df["case_id"].isin(cases) & (df["index"].astype(int) < per_case)
    keep &= (df[columns].astype(str) == pd.Series(group, index=columns)).all(axis=1)
    return df[keep]


def ablation_frames(component: "Component", rows: Sequence["Row"], cases: Sequence["Case"], per_case: int,
                    opts: "AblateOptions", ids: "ScoreIds") -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """(the table in long form, TABLE_COLUMNS; the paired differences against the reference,
    PAIRED_COLUMNS; decimals per metric). ids: the score groups of the ablation's scoring."""
    from ..report.aggregate import run_label

    backbone = "tiny" if opts.backbone == "tiny" else "sdxl"
    wanted = {c.id for c in cases}
    families = list(dict.fromkeys(_family(m) for m in component.metrics))
    frames: dict[str, dict[str, pd.DataFrame]] = {}  # variant -> family -> scores
    table, paired = [], []
    for row in rows:
        frames[row.variant.name] = {f: _scores(row.run.run_dir, f, ids(f, backbone), wanted, per_case)
                                    for f in families} if row.run.run_dir.is_dir() else {}
    for row in rows:
        label = run_label(row.run.run_dir) if row.run.run_dir.is_dir() else row.run.run_dir.name
        for family, df in frames[row.variant.name].items():
            summary = summarize(df, opts.n_boot, opts.seed, family=family)
            for r in summary.itertuples(index=False):
                if r.kind in component.kinds and r.metric in component.metrics:
                    table.append({"variant": row.variant.name, "run": label, "kind": r.kind, "metric": r.metric,
                                  "mean": r.mean, "ci_low": r.ci_low, "ci_high": r.ci_high, "n_cases": r.n_cases,
                                  "n_images": r.n_images})
    reference = frames.get(component.reference, {})
    for row in rows:
        if row.variant.name == component.reference:
            continue
        for family, df in frames[row.variant.name].items():
            ref = reference.get(family)
            if df.empty or ref is None or ref.empty:
                continue
            diff = compare(df, ref, opts.n_boot, opts.seed, family=family)
            for r in diff.itertuples(index=False):
                if r.kind in component.kinds and r.metric in component.metrics:
                    paired.append({"variant": row.variant.name, "reference": component.reference, "kind": r.kind,
                                   "metric": r.metric, "n_cases": r.n_cases, "mean_variant": r.mean_a,
                                   "mean_reference": r.mean_b, "diff": r.diff, "ci_low": r.ci_low,
                                   "ci_high": r.ci_high})
    digits = {m: column_digits(m, opts.protocol) for m in component.metrics}
    order = {"kind": {k: i for i, k in enumerate(component.kinds)},
             "metric": {m: i for i, m in enumerate(component.metrics)},
             "variant": {v.name: i for i, v in enumerate(component.variants)}}
    return _ordered(pd.DataFrame(table, columns=list(TABLE_COLUMNS)), order), \
        _ordered(pd.DataFrame(paired, columns=list(PAIRED_COLUMNS)), order), digits


def _ordered(df: pd.DataFrame, order: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Rows in the component's order: variant, then kind, then metric."""
    keys = [df[c].map(order[c]) for c in ("variant", "kind", "metric")]
    return df.assign(_v=keys[0], _k=keys[1], _m=keys[2]).sort_values(["_v", "_k", "_m"], kind="mergesort") \
        .drop(columns=["_v", "_k", "_m"]).reset_index(drop=True)


# -- cells ------------------------------------------------------------------------------------
def _columns(component: "Component") -> list[tuple[str, str]]:
    return [(k, m) for k in component.kinds for m in component.metrics]


def _cells(component: "Component", table: pd.DataFrame, digits: dict[str, int]) -> list[tuple[str, list[Cell]]]:
    """(row label, a Cell per column): mean ± CI half-width, best and second by the column's direction."""
    indexed = table.set_index(["variant", "kind", "metric"])
    names = [v.name for v in component.variants]
    columns = []
    for kind, metric in _columns(component):
        means, halves = [], []
        for name in names:
            key = (name, kind, metric)
            row = indexed.loc[key] if key in indexed.index else None
            mean = None if row is None else _fmt(float(row["mean"]), digits[metric])
            means.append(mean)
            halves.append(None if mean is None else _fmt((float(row["ci_high"]) - float(row["ci_low"])) / 2,
                                                         digits[metric]))
        marks = _marks(means, column_spec(metric).direction)
        columns.append([Cell(m, h, k) for m, h, k in zip(means, halves, marks)])
    return [(name, [col[i] for col in columns]) for i, name in enumerate(names)]


def _n_cases(component: "Component", table: pd.DataFrame) -> str:
    parts = []
    for kind in component.kinds:
        n = table.loc[table["kind"] == kind, "n_cases"]
        low, high = (int(n.min()), int(n.max())) if len(n) else (0, 0)
        parts.append(f"{kind} {low}" if low == high else f"{kind} {low}-{high}")
    return ", ".join(parts)


def _header(component: "Component") -> list[str]:
    return ["Variant"] + [f"{KIND_TITLES.get(k, k)} {column_spec(m).title}" for k, m in _columns(component)]


def table_markdown(component: "Component", table: pd.DataFrame, digits: dict[str, int], title: str) -> str:
    body = [[name, *(_md_cell(c) for c in cells)] for name, cells in _cells(component, table, digits)]
    return "\n".join([
        f"# {title}", "",
        "Mean over cases (each case: mean over its images) ± half the 95% bootstrap interval; "
        "**best** and <u>second</u> per column.", "",
        tabulate(body, headers=_header(component), tablefmt="github", disable_numparse=True,
                 colalign=("left",) + ("right",) * (len(body[0]) - 1)),
        "", f"n (cases per row): {_n_cases(component, table)}", "",
    ])


def _diff_text(r, digits: int) -> str:
    if pd.isna(r.diff):
        return "–"
    interval = "" if pd.isna(r.ci_low) else f" [{r.ci_low:+.{digits}f}, {r.ci_high:+.{digits}f}]"
    # an interval that excludes 0: a difference the cases support
    sure = "" if pd.isna(r.ci_low) or r.ci_low <= 0 <= r.ci_high else " *"
    return f"{r.diff:+.{digits}f}{interval}{sure}"


def paired_markdown(component: "Component", paired: pd.DataFrame, digits: dict[str, int]) -> str:
    head = [f"## Each row minus {component.reference}, paired by case", "",
            "Mean difference over the cases both rows scored, [95% paired bootstrap interval]; "
            "* where the interval excludes 0.", ""]
    if paired.empty:
        return "\n".join([*head, "No paired scores.", ""])
    indexed = {(r.variant, r.kind, r.metric): r for r in paired.itertuples(index=False)}
    body = []
    for v in component.variants:
        if v.name == component.reference:
            continue
        # one decimal more than the table: differences are small beside the means
        body.append([v.name, *(_diff_text(indexed[(v.name, k, m)], digits[m] + 1) if (v.name, k, m) in indexed else "–"
                               for k, m in _columns(component))])
    return "\n".join([*head, tabulate(body, headers=_header(component), tablefmt="github", disable_numparse=True,
                                      colalign=("left",) + ("right",) * (len(body[0]) - 1)), ""])


def table_latex(component: "Component", table: pd.DataFrame, digits: dict[str, int], title: str) -> str:
    header, rules, start = [""], [], 2
    for kind in component.kinds:
        n = len(component.metrics)
        header.append(rf"\multicolumn{{{n}}}{{c}}{{{tex_escape(KIND_TITLES.get(kind, kind))}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    titles = ["Method"] + [tex_escape(column_spec(m).title) for _, m in _columns(component)]
    rows = _cells(component, table, digits)
    caption = (tex_escape(title) + r"; mean over cases $\pm$ 95\% bootstrap half-width; n (cases per row): "
               + tex_escape(_n_cases(component, table)) + ".")
    head = [" & ".join(header) + r" \\", " ".join(rules), " & ".join(titles) + r" \\"]
    return ("% needs \\usepackage{booktabs}\n"
            + _tex_tabular(caption, len(_columns(component)), head, rows)
            + "\n")

