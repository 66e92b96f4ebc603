"""Per-image scores -> per-case means -> per-run summaries with bootstrap CIs over cases.

The unit of a benchmark is the case, not the image: a case with more images must not weigh
more, so every mean and every bootstrap here is over case means. Scores from different
protocols or encoders are never pooled (see GROUP), nor a family's scores from different
models (its file's `model` column, FAMILY_GROUP).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import UserError
from ..methods.cards import format_value, variant_name
from ..metrics.registry import FAMILIES, PAPER, column_spec, family_columns
from ..runs import (FAMILY_GROUP, FAMILY_KEY_COLUMNS, FAMILY_SCORES, RUN_JSON, SCORE_COLUMNS, SCORE_FLOAT_COLUMNS,
                    RunDir)
from ..runs import SCORE_GROUP as GROUP  # scores are comparable only within one group
from ..runs import SCORES as SCORES_CSV

METRICS = ("clip_t", "clip_r", "clip_i", "dino")
KINDS = ("single", "multi")
KIND_TITLES = {"single": "Single-object", "multi": "Multi-object", "all": "All"}  # as the paper's tables
ALL = "all"
RUN_COLUMNS = ("run", "run_dir", "suite", "method", "backbone")
# a summary row of the paper family has an empty model; one of another family empty GROUP columns
SUMMARY_KEYS = ("run", "suite", "kind", *GROUP, "model", "metric")
SUMMARY_COLUMNS = (*SUMMARY_KEYS, "mean", "ci_low", "ci_high", "n_cases", "n_images")
COMPARE_COLUMNS = ("kind", "metric", "n_cases", "mean_a", "mean_b", "diff", "ci_low", "ci_high")


def summary_metrics(family: str) -> tuple[str, ...]:
    """The columns a family contributes to summaries and tables (per-subject detail left out)."""
    return METRICS if family == PAPER else tuple(c.name for c in family_columns(family) if c.summary)


def _read_run_json(run_dir: Path) -> dict[str, str]:
    path = run_dir / RUN_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        names = {k: str(meta[k]["name"]) for k in ("suite", "method", "backbone")}
        label = (meta["method"].get("run") or {}).get("label")
        if label:  # decided at load time (e.g. which local encoder): part of the method's name
            names["method"] = variant_name(names["method"], label)
        return names
    except FileNotFoundError:
        raise UserError("scores.csv has no run.json beside it", path=run_dir,
                        hint="score a run folder made by `relbench generate`") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"run.json lacks suite/method/backbone names ({exc!r})", path=path) from None


def run_label(run_dir: Path) -> str:
    """A run's row label in tables: its folder's name, and what the method decided at load
    time when the name does not say it (`relationbooth@tiny [local_encoder=stock]`)."""
    name = run_dir.resolve().name
    try:
        label = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))["method"].get("run", {}).get("label")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        label = None  # _read_run_json reports a broken run.json
    # a setting the name already says as a whole `key=value` (a variant's bracket: `rb[local_encoder=stock]`);
    # `local_encoder=stock` inside `local_encoder=stock2` does not say it
    said = set(re.split(r"[\[\],@ ]", name))
    shown = [pair for k, v in sorted((label or {}).items()) if (pair := f"{k}={format_value(v)}") not in said]
    return f"{name} [{','.join(shown)}]" if shown else name


def load_run_scores(run_dir: str | Path) -> pd.DataFrame:
    """One run's per-image scores, tagged with the run's label, suite, method and backbone.

    Refuses a file that would count an image twice (two rows of one image and score group)
    or that scores an image the run no longer holds (its manifest line now names another
    sha256, or none): dropping such rows here would change n without a word, and `relbench
    score`, which leaves neither, is the fix.
    """
    run_dir = Path(run_dir)
    path = run_dir / SCORES_CSV
    if not path.exists():
        return pd.DataFrame(columns=[*SCORE_COLUMNS, *RUN_COLUMNS])
    # keep_default_na=False: a subject or predicate called "NA" or "None" stays a string
    try:
        df = pd.read_csv(
            path,
            dtype={c: (float if c in SCORE_FLOAT_COLUMNS else "int64" if c == "index" else str)
                   for c in SCORE_COLUMNS},
            keep_default_na=False,
            na_values={c: ["", "nan", "NaN"] for c in SCORE_FLOAT_COLUMNS},
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"scores.csv could not be read ({exc})", path=path,
                        hint="rescore the run to rewrite it") from None
    missing = [c for c in SCORE_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"scores.csv lacks columns: {', '.join(missing)}", path=path,
                        hint="rescore the run with this version of relbench")
    return _tagged(df, list(SCORE_COLUMNS), run_dir, path, GROUP)


def load_run_family(run_dir: str | Path, family: str) -> pd.DataFrame:
    """One run's scores-<family>.csv (empty when the run has none), checked and tagged like
    load_run_scores."""
    run_dir = Path(run_dir)
    path = run_dir / FAMILY_SCORES.format(family=family)
    columns = _file_columns(family)
    floats = set(columns) - set(FAMILY_KEY_COLUMNS)
    if not path.exists():
        return pd.DataFrame(columns=[*columns, *RUN_COLUMNS])
    try:
        df = pd.read_csv(path, dtype={c: (float if c in floats else "int64" if c == "index" else str) for c in columns},
                         keep_default_na=False, na_values={c: ["", "nan", "NaN"] for c in floats})
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{path.name} could not be read ({exc})", path=path, hint="rescore the run to rewrite it") from None
    if list(df.columns) != columns:
        raise UserError(f"{path.name} has other columns than this version of relbench writes", path=path,
                        hint="delete it (it is derived data) and score again")
    return _tagged(df, columns, run_dir, path, FAMILY_GROUP)


def _file_columns(family: str) -> list[str]:
    return list(SCORE_COLUMNS) if family == PAPER else [*FAMILY_KEY_COLUMNS, *(c.name for c in family_columns(family))]


def _tagged(df: pd.DataFrame, columns: list[str], run_dir: Path, path: Path, group: Sequence[str]) -> pd.DataFrame:
    """The rows, checked (one per image and group, all of current images) and tagged with the
    run's label, folder, suite, method and backbone."""
    meta = _read_run_json(run_dir)
    _check_one_row_per_image(df, run_dir, path, group)
    df = df[columns].copy()
    df["run"] = run_label(run_dir)
    df["run_dir"] = str(run_dir)
    for key, value in meta.items():
        df[key] = value
    return df


def _check_one_row_per_image(df: pd.DataFrame, run_dir: Path, path: Path, group: Sequence[str]) -> None:
    """See load_run_scores: duplicate rows, and rows of images the manifest no longer holds
    (checked where the manifest records hashes; a scores file without a manifest is taken as is)."""
    keys = ["case_id", "index", *group]
    dup = df[df.duplicated(keys, keep=False)]
    if len(dup):
        case_id, index = dup.iloc[0][["case_id", "index"]]
        raise UserError(f"{path.name} has {len(dup)} rows for {len(dup.drop_duplicates(keys))} image(s) (e.g. "
                        f"{case_id} sample {index} twice in one score group): they would be counted twice", path=path,
                        hint="run `relbench score` on the run: it keeps one row per image")
    run = RunDir(run_dir)
    if not run.manifest.is_file():
        return
    current = {key: r.get("sha256") for key, r in run.latest().items()}
    stale = [(c, i) for c, i, sha in df[["case_id", "index", "image_sha256"]].itertuples(index=False)
             if (c, int(i)) not in current or current[(c, int(i))] not in (None, sha)]
    if stale:
        raise UserError(f"{path.name} scores {len(stale)} image(s) the run no longer holds (regenerated or dropped "
                        f"since scoring, e.g. {stale[0][0]} sample {stale[0][1]})", path=path,
                        hint="run `relbench score` on the run: it drops those rows and scores the images now there")


def load_scores(run_dirs: Iterable[str | Path], family: str = PAPER) -> pd.DataFrame:
    """All runs' scores of a family in one frame; refuses two runs of one suite that share a label."""
    frames = [load_run_scores(d) if family == PAPER else load_run_family(d, family) for d in run_dirs]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=[*_file_columns(family), *RUN_COLUMNS])
    df = pd.concat(frames, ignore_index=True)
    dirs = df.drop_duplicates(["run", "suite", "run_dir"]).groupby(["run", "suite"])["run_dir"].apply(list)
    clashes = dirs[dirs.map(len) > 1]
    if len(clashes):
        (label, suite), paths = next(iter(clashes.items()))
        raise UserError(f"runs {', '.join(paths)} of suite {suite} share the label {label!r}",
                        hint="rename one run folder: the folder name is the leaderboard row")
    return df


def case_means(df: pd.DataFrame, metrics: Sequence[str] = METRICS, group: Sequence[str] = GROUP) -> pd.DataFrame:
    """Each metric's mean over a case's images (NaN images skipped), plus the case's image count."""
    grouped = df.groupby(["run", "suite", "kind", *group, "case_id"], sort=True, dropna=False)
    out = grouped[list(metrics)].mean()
    out["n_images"] = grouped.size()
    return out.reset_index()


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; a fixed seed makes reports reproducible."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _kind_slices(cases: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The cases of each kind present, in a fixed order, then all cases together."""
    present = [k for k in KINDS if (cases["kind"] == k).any()]
    present += sorted(set(cases["kind"]) - set(KINDS))
    return [(k, cases[cases["kind"] == k]) for k in present] + [(ALL, cases)]


def summarize(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
              family: str = PAPER) -> pd.DataFrame:
    """One row per run, suite, kind (and "all"), score group and metric: mean over cases with a CI.

    family: which scores df holds (load_scores(..., family)); its summary columns are the metrics.
    n_images counts the images with a value for the metric, n_cases the cases with one.
    """
    if df.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    metrics = list(summary_metrics(family))
    group = list(GROUP if family == PAPER else FAMILY_GROUP)
    case_keys = ["run", "suite", "kind", *group, "case_id"]
    # per case: the metric means, and how many images had a value for each metric ("<metric>_n")
    counts = df.groupby(case_keys, sort=True, dropna=False)[metrics].count().reset_index()
    cases = case_means(df, metrics, group).merge(counts, on=case_keys, suffixes=("", "_n"))
    rows = []
    run_keys = ["run", "suite", *group]
    blank = {k: "" for k in (*GROUP, *FAMILY_GROUP)}
    for key, run_cases in cases.groupby(run_keys, sort=True, dropna=False):
        for kind, kind_cases in _kind_slices(run_cases):
            for metric in metrics:
                values = kind_cases[metric].dropna().to_numpy()
                low, high = bootstrap_ci(values, n_boot, seed, level)
                rows.append({
                    **blank, **dict(zip(run_keys, key)), "kind": kind, "metric": metric,
                    "mean": float(values.mean()) if len(values) else float("nan"),
                    "ci_low": low, "ci_high": high,
                    "n_cases": len(values), "n_images": int(kind_cases[f"{metric}_n"].sum()),
                })
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def summarize_runs(run_dirs: Sequence[str | Path], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> pd.DataFrame:
    """Every family's summary of the runs (scores.csv and each scores-<family>.csv) in one frame."""
    return summarize_families({f: load_scores(run_dirs, f) for f in FAMILIES}, n_boot, seed, level)


def summarize_families(frames: Mapping[str, pd.DataFrame], n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> pd.DataFrame:
    """summarize() of each family's scores (family -> load_scores(..., family)) in one frame."""
    parts = [summarize(df, n_boot, seed, level, family=f) for f, df in frames.items()]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(SUMMARY_COLUMNS))


def _groups(df: pd.DataFrame, group: Sequence[str] = GROUP) -> set[tuple[str, ...]]:
    return set(df[list(group)].drop_duplicates().itertuples(index=False, name=None))


def _one_run_means(df: pd.DataFrame, side: str, metrics: Sequence[str], group: Sequence[str]) -> pd.DataFrame:
    """Case means of a frame that must hold exactly one run: pairing two runs' cases needs that."""
    runs = df[["run", "suite"]].drop_duplicates()
    if len(runs) > 1:
        names = ", ".join(f"{r}/{s}" for r, s in runs.itertuples(index=False, name=None))
        raise UserError(f"side {side} of the comparison holds several runs ({names})",
                        hint="compare one run folder against one run folder")
    return case_means(df, metrics, group).drop(columns=["run", "suite", "n_images"])


def compare(df_a: pd.DataFrame, df_b: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
            level: float = 0.95, family: str = PAPER) -> pd.DataFrame:
    """Run a minus run b, paired by case: the paired bootstrap sees only per-case differences,
    so case difficulty (shared by both runs) drops out of the CI. family: which scores the
    frames hold (a family other than the paper's is paired within one model id)."""
    group = list(GROUP if family == PAPER else FAMILY_GROUP)
    metrics = summary_metrics(family)
    shared = sorted(_groups(df_a, group) & _groups(df_b, group))
    if not shared:
        raise UserError(
            f"the two runs share no ({', '.join(group)}) group: "
            f"a has {sorted(_groups(df_a, group))}, b has {sorted(_groups(df_b, group))}",
            hint="score both runs with the same --protocol and the same models (encoders, --metrics)",
        )
    keys = [*group, "kind", "case_id"]
    paired = _one_run_means(df_a, "a", metrics, group).merge(_one_run_means(df_b, "b", metrics, group), on=keys,
                                                              suffixes=("_a", "_b"))
    if paired.empty:
        raise UserError("the two runs scored no case in common (same case_id, kind and score group)",
                        hint="compare two runs of the same suite")
    rows = []
    for group_key, group_cases in paired.groupby(group, sort=True):
        for kind, kind_cases in _kind_slices(group_cases):
            for metric in metrics:
                both = kind_cases[[f"{metric}_a", f"{metric}_b"]].dropna().to_numpy()
                diffs = both[:, 0] - both[:, 1]
                low, high = bootstrap_ci(diffs, n_boot, seed, level)
                mean_a, mean_b, diff = (float(v.mean()) if len(v) else float("nan")
                                        for v in (both[:, 0], both[:, 1], diffs))
                rows.append({**dict(zip(group, group_key if isinstance(group_key, tuple) else (group_key,))),
                             "kind": kind, "metric": metric,
                             "n_cases": len(diffs), "mean_a": mean_a, "mean_b": mean_b,
                             "diff": diff, "ci_low": low, "ci_high": high})
    columns = [*group, *COMPARE_COLUMNS] if len(shared) > 1 else list(COMPARE_COLUMNS)
    return pd.DataFrame(rows)[columns]


def compare_runs(run_a: str | Path, run_b: str | Path, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> pd.DataFrame:
    """compare() on every family both runs have scores of, in one table with each metric's
    direction ("higher" or "lower" is better) and the group it was scored with (`scored_with`:
    protocol and encoders, or the model id)."""
    parts = []
    for family in FAMILIES:
        a, b = load_scores([run_a], family), load_scores([run_b], family)
        if a.empty or b.empty:
            continue
        table = compare(a, b, n_boot, seed, level, family)
        group = list(GROUP if family == PAPER else FAMILY_GROUP)
        if group[0] in table.columns:  # several shared groups
            table["scored_with"] = table[group].astype(str).agg(" · ".join, axis=1)
            table = table.drop(columns=group)
        else:
            table["scored_with"] = " · ".join(next(iter(_groups(a, group) & _groups(b, group))))
        parts.append(table)
    if not parts:
        raise UserError("the two runs have no scores of one metric family in common",
                        hint="score both with `relbench score` (the same --metrics)")
    out = pd.concat(parts, ignore_index=True)
    out.insert(out.columns.get_loc("metric") + 1, "direction", out["metric"].map(lambda m: column_spec(m).direction))
    return out
