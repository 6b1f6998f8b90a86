"""Shared by the benchmark scripts: results files whose rows are kept per preset.

A rerun measuring some presets keeps the earlier rows of the others while their preset still
builds the same teacher (same ``preset_key``); stale rows are dropped with a message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from knowpress.worlds import PRESETS


def merge(previous: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``fresh`` plus the ``previous`` rows of other presets still current, in preset order.

    A row is current when its preset still exists and has the key the row was measured
    with (rows from before ``preset_key`` was recorded: the key ending the teacher path).
    """
    names, kept = {row["preset"] for row in fresh}, []
    for row in previous:
        if row["preset"] in names or row["preset"] not in PRESETS:
            continue
        key = row.get("preset_key") or str(row["teacher"]).rsplit("-", 1)[-1]
        current = PRESETS.get(row["preset"]).key()
        if key == current:
            kept.append(row)
        else:
            print(f"dropped the row of {row['preset']}: teacher {key}, the preset builds {current}")
    order = PRESETS.names()
    return sorted([*kept, *fresh], key=lambda row: order.index(row["preset"]))


def earlier(previous: list[dict[str, Any]], entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``previous`` entry measured on ``entry``'s preset with the same teacher key."""
    return next((p for p in previous if p["preset"] == entry["preset"]
                 and p.get("preset_key") == entry["preset_key"]), None)  # fmt: skip


def write_presets(
    path: Path,
    fresh: list[dict[str, Any]],
    plot: Callable[[list[dict[str, Any]], Path], None],
    prepare: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None] | None = None,
) -> None:
    """Merge ``fresh`` into the ``{"presets": [...]}`` file at ``path`` (``prepare(previous,
    fresh)`` first, e.g. to carry rows over), write it and its plot (``path`` as .png)."""
    previous = json.loads(path.read_text())["presets"] if path.is_file() else []
    if prepare is not None:
        prepare(previous, fresh)
    merged = merge(previous, fresh)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"presets": merged}, indent=1) + "\n")
    plot(merged, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def save_figure(
    path: Path, panels: int, draw: Callable[[list[Any]], None], width: float = 5
) -> None:
    """One row of ``panels`` axes drawn by ``draw(axes)``, gridded, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 4), dpi=110, squeeze=False)
    draw(list(axes[0]))
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def retention_axes(ax: Any, title: str) -> None:
    """A panel of worst-task retention against stored bytes / the bf16 teacher's."""
    ax.set_title(title)
    ax.set_xlabel("stored bytes / bf16 teacher")
    ax.set_ylabel("worst-task retention")


def grouped_bars(ax: Any, labels: list[str], series: dict[str, list[float]]) -> None:
    """One group of bars per label, one bar per series in each (a legend entry each)."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
