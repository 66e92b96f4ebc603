"""Per-image scores -> per-case means -> per-run summaries with bootstrap CIs over cases.

The unit of a benchmark is the case, not the image: a case with more images must not weigh
more, so every mean and every bootstrap here is over case means. Scores from different
protocols or encoders are never pooled (see GROUP).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import UserError
from ..runs import RUN_JSON, SCORE_COLUMNS, SCORE_FLOAT_COLUMNS, RunDir
from ..runs import SCORES as SCORES_CSV

METRICS = ("clip_t", "clip_r", "clip_i", "dino")
GROUP = ("protocol", "clip_encoder", "dino_encoder")  # scores are comparable only within one group
KINDS = ("single", "multi")
ALL = "all"
RUN_COLUMNS = ("run", "run_dir", "suite", "method", "backbone")
CASE_KEYS = ("run", "suite", "kind", *GROUP, "case_id")
SUMMARY_KEYS = ("run", "suite", "kind", *GROUP, "metric")
SUMMARY_COLUMNS = (*SUMMARY_KEYS, "mean", "ci_low", "ci_high", "n_cases", "n_images")
COMPARE_COLUMNS = ("kind", "metric", "n_cases", "mean_a", "mean_b", "diff", "ci_low", "ci_high")


def _read_run_json(run_dir: Path) -> dict[str, str]:
    path = run_dir / RUN_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return {k: str(meta[k]["name"]) for k in ("suite", "method", "backbone")}
    except FileNotFoundError:
        raise UserError("scores.csv has no run.json beside it", path=run_dir,
                        hint="score a run folder made by `relbench generate`") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"run.json lacks suite/method/backbone names ({exc!r})", path=path) from None


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
    meta = _read_run_json(run_dir)
    _check_one_row_per_image(df, run_dir, path)
    df = df[list(SCORE_COLUMNS)].copy()
    df["run"] = run_dir.resolve().name
    df["run_dir"] = str(run_dir)
    for key, value in meta.items():
        df[key] = value
    return df


def _check_one_row_per_image(df: pd.DataFrame, run_dir: Path, path: Path) -> None:
    """See load_run_scores: duplicate rows, and rows of images the manifest no longer holds
    (checked where the manifest records hashes; a scores.csv without a manifest is taken as is)."""
    keys = ["case_id", "index", *GROUP]
    dup = df[df.duplicated(keys, keep=False)]
    if len(dup):
        case_id, index = dup.iloc[0][["case_id", "index"]]
        raise UserError(f"scores.csv has {len(dup)} rows for {len(dup.drop_duplicates(keys))} image(s) (e.g. "
                        f"{case_id} sample {index} twice in one score group): they would be counted twice", path=path,
                        hint="run `relbench score` on the run: it keeps one row per image")
    run = RunDir(run_dir)
    if not run.manifest.is_file():
        return
    current = {key: r.get("sha256") for key, r in run.latest().items()}
    stale = [(c, i) for c, i, sha in df[["case_id", "index", "image_sha256"]].itertuples(index=False)
             if (c, int(i)) not in current or current[(c, int(i))] not in (None, sha)]
    if stale:
        raise UserError(f"scores.csv scores {len(stale)} image(s) the run no longer holds (regenerated or dropped "
                        f"since scoring, e.g. {stale[0][0]} sample {stale[0][1]})", path=path,
                        hint="run `relbench score` on the run: it drops those rows and scores the images now there")


def load_scores(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """All runs' scores in one frame; refuses two runs of one suite that share a label."""
    frames = [load_run_scores(d) for d in run_dirs]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=[*SCORE_COLUMNS, *RUN_COLUMNS])
    df = pd.concat(frames, ignore_index=True)
    dirs = df.drop_duplicates(["run", "suite", "run_dir"]).groupby(["run", "suite"])["run_dir"].apply(list)
    clashes = dirs[dirs.map(len) > 1]
    if len(clashes):
        (label, suite), paths = next(iter(clashes.items()))
        raise UserError(f"runs {', '.join(paths)} of suite {suite} share the label {label!r}",
                        hint="rename one run folder: the folder name is the leaderboard row")
    return df


def case_means(df: pd.DataFrame) -> pd.DataFrame:
    """Each metric's mean over a case's images (NaN images skipped), plus the case's image count."""
    grouped = df.groupby(list(CASE_KEYS), sort=True, dropna=False)
    out = grouped[list(METRICS)].mean()
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


def summarize(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """One row per run, suite, kind (and "all"), score group and metric: mean over cases with a CI.

    n_images counts the images with a value for the metric, n_cases the cases with one.
    """
    if df.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    # per case: the metric means, and how many images had a value for each metric ("<metric>_n")
    counts = df.groupby(list(CASE_KEYS), sort=True, dropna=False)[list(METRICS)].count().reset_index()
    cases = case_means(df).merge(counts, on=list(CASE_KEYS), suffixes=("", "_n"))
    rows = []
    run_keys = ["run", "suite", *GROUP]
    for key, run_cases in cases.groupby(run_keys, sort=True, dropna=False):
        for kind, kind_cases in _kind_slices(run_cases):
            for metric in METRICS:
                values = kind_cases[metric].dropna().to_numpy()
                low, high = bootstrap_ci(values, n_boot, seed, level)
                rows.append({
                    **dict(zip(run_keys, key)), "kind": kind, "metric": metric,
                    "mean": float(values.mean()) if len(values) else float("nan"),
                    "ci_low": low, "ci_high": high,
                    "n_cases": len(values), "n_images": int(kind_cases[f"{metric}_n"].sum()),
                })
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def _groups(df: pd.DataFrame) -> set[tuple[str, ...]]:
    return set(df[list(GROUP)].drop_duplicates().itertuples(index=False, name=None))


def _one_run_means(df: pd.DataFrame, side: str) -> pd.DataFrame:
    """Case means of a frame that must hold exactly one run: pairing two runs' cases needs that."""
    runs = df[["run", "suite"]].drop_duplicates()
    if len(runs) > 1:
        names = ", ".join(f"{r}/{s}" for r, s in runs.itertuples(index=False, name=None))
        raise UserError(f"side {side} of the comparison holds several runs ({names})",
                        hint="compare one run folder against one run folder")
    return case_means(df).drop(columns=["run", "suite", "n_images"])


def compare(df_a: pd.DataFrame, df_b: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
            level: float = 0.95) -> pd.DataFrame:
    """Run a minus run b, paired by case: the paired bootstrap sees only per-case differences,
    so case difficulty (shared by both runs) drops out of the CI."""
    shared = sorted(_groups(df_a) & _groups(df_b))
    if not shared:
        raise UserError(
            "the two runs share no (protocol, clip_encoder, dino_encoder) group: "
            f"a has {sorted(_groups(df_a))}, b has {sorted(_groups(df_b))}",
            hint="score both runs with the same --protocol and the same CLIP and DINO encoders",
        )
    keys = [*GROUP, "kind", "case_id"]
    paired = _one_run_means(df_a, "a").merge(_one_run_means(df_b, "b"), on=keys, suffixes=("_a", "_b"))
    if paired.empty:
        raise UserError("the two runs scored no case in common (same case_id, kind and score group)",
                        hint="compare two runs of the same suite")
    rows = []
    for group, group_cases in paired.groupby(list(GROUP), sort=True):
        for kind, kind_cases in _kind_slices(group_cases):
            for metric in METRICS:
                both = kind_cases[[f"{metric}_a", f"{metric}_b"]].dropna().to_numpy()
                diffs = both[:, 0] - both[:, 1]
                low, high = bootstrap_ci(diffs, n_boot, seed, level)
                mean_a, mean_b, diff = (float(v.mean()) if len(v) else float("nan")
                                        for v in (both[:, 0], both[:, 1], diffs))
                rows.append({**dict(zip(GROUP, group)), "kind": kind, "metric": metric,
                             "n_cases": len(diffs), "mean_a": mean_a, "mean_b": mean_b,
                             "diff": diff, "ci_low": low, "ci_high": high})
    columns = [*GROUP, *COMPARE_COLUMNS] if len(shared) > 1 else list(COMPARE_COLUMNS)
    return pd.DataFrame(rows)[columns]
