"""Bar charts of table rows with their 95% intervals, as PNG (to look at) and SVG (for the HTML
report and papers), through matplotlib's non-interactive Agg backend.

The SVG is reproducible: no creation date, fixed element ids (svg.hashsalt), text as text.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

# matplotlib's tab10, in order: row i always has colour i, in every chart
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")


def bar_chart(rows: pd.DataFrame, metric: str, order: Sequence[str], out_stem: Path, *, title: str = "",
              label_column: str = "variant") -> list[Path]:
    """One metric's grouped bar chart: a group per kind, a bar per row label (in `order`), the
    bar at the mean and a whisker over [ci_low, ci_high]. `rows`: columns label_column, kind,
    mean, ci_low, ci_high (table.csv of an ablation, one metric). Writes out_stem.png and
    out_stem.svg (atomically) and returns both paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..metrics.registry import column_spec
    from ..runs import atomic_write_bytes
    from .aggregate import KIND_TITLES

    spec = column_spec(metric)
    kinds = list(dict.fromkeys(rows["kind"]))
    labels = [o for o in order if (rows[label_column] == o).any()]
    width = 0.8 / max(1, len(labels))
    with plt.rc_context({"svg.hashsalt": "relationbench", "svg.fonttype": "none", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + len(kinds) * (0.6 + 0.5 * len(labels))), 3.4))
        try:
            for i, label in enumerate(labels):
                mine = rows[rows[label_column] == label].set_index("kind")
                means = np.array([mine["mean"].get(k, np.nan) for k in kinds], dtype=float)
                low = np.array([mine["ci_low"].get(k, np.nan) for k in kinds], dtype=float)
                high = np.array([mine["ci_high"].get(k, np.nan) for k in kinds], dtype=float)
                x = np.arange(len(kinds)) + (i - (len(labels) - 1) / 2) * width
                errors = np.nan_to_num(np.stack([means - low, high - means]), nan=0.0).clip(min=0)
                ax.bar(x, means, width * 0.92, color=COLORS[i % len(COLORS)], label=label,
                       yerr=errors, capsize=3, error_kw={"elinewidth": 1, "ecolor": "#333333"})
            ax.set_xticks(np.arange(len(kinds)), [KIND_TITLES.get(k, k) for k in kinds])
            arrow = "↑" if spec.direction == "higher" else "↓"
            ax.set_ylabel(f"{spec.title} {arrow}")
            ax.axhline(0, color="#333333", linewidth=0.8)  # bars start at 0: their lengths compare honestly
            ax.set_title(f"{title}: {spec.title}" if title else spec.title, fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
            ax.grid(axis="y", color="#dddddd", linewidth=0.6)
            ax.set_axisbelow(True)
            ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(labels), 3))
            fig.tight_layout()
            out_stem = Path(out_stem)
            out_stem.parent.mkdir(parents=True, exist_ok=True)
            paths = []
            for suffix, fmt, meta in ((".png", "png", {"Software": None}), (".svg", "svg", {"Date": None})):
                buffer = io.BytesIO()
                fig.savefig(buffer, format=fmt, dpi=144, metadata=meta, bbox_inches="tight")
                path = out_stem.with_suffix(suffix)
                atomic_write_bytes(path, buffer.getvalue())
                paths.append(path)
        finally:
            plt.close(fig)
    return paths
