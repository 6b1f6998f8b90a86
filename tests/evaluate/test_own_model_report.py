"""A user's own model scored on its own text with ``kl`` alone: the report gives KL, top-1 and
flips on text per stage with their intervals against stored bytes, no ``None``, no world id
for a model that has none, and a plot with points (KL and top-1 vs bytes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from knowpress.cli.app import main
from knowpress.pipeline.render import plot_figure
from knowpress.testing.models import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own")
    tiny_llama(seed=3).save_pretrained(root / "model")  # a plain HF folder: no world
    tiny_tokenizer().save_pretrained(root / "model")
    text = root / "notes.txt"
    text.write_text("\n\n".join(
        " ".join(f"w{(i * 7 + j * 3) % 50}" for j in range(40)) for i in range(24)
    ))  # fmt: skip
    recipe = {
        "version": 1,
        "model": {"path": str(root / "model")},
        "stages": [{"kind": "quantize", "method": {"name": "rtn", "bits": b, "group_size": 32}}
                   for b in (8, 4, 2)],
        "evaluate": {"tasks": ["kl"], "text": {"path": str(text)}},
        "gate": {"max_kl": 5.0, "min_top1": 0.05, "confidence": 0.95},
    }  # fmt: skip
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["apply", str(root / "r.yaml"), "-o", str(root / "out"), "-q"]) == 0
    return root / "out"


def test_the_report_of_a_kl_only_run_means_something(own_run: Path) -> None:
    markdown = (own_run / "report.md").read_text()
    assert "None" not in markdown and "- world:" not in markdown
    assert "measured on text: `" in markdown and "(no fact world)" in markdown
    assert "worst retention" not in markdown and "n/a (" not in markdown
    lines = markdown.splitlines()
    start = lines.index("## Knowledge retained vs bytes stored") + 2
    table = lines[start : lines.index("", start)]
    head = table[0]
    assert "kl (kl_nats_per_token)" in head and "kl top-1" in head
    rows = {line.split(" | ")[0][2:]: line for line in table[1:] if "quantize" in line}
    assert set(rows) == {"01-quantize", "02-quantize", "03-quantize"}
    for line in rows.values():
        assert line.count("[") >= 2  # KL and top-1 each with an interval
    assert "## Flips against the reference" in markdown and "text tokens" in markdown
    report = json.loads((own_run / "report.json").read_text())
    kl = [row["scores"]["kl"] for row in report["rows"]]
    assert kl[0] == 0 and kl[1] < kl[2] < kl[3]  # fewer bits, further from the reference
    for row in report["rows"][1:]:
        low, high = row["intervals"]["kl"]["score"]
        assert low <= row["scores"]["kl"] <= high
        assert row["paired"]["kl"]["unit"] == "text tokens"
    assert report["gate"]["passed"] and report["gate"]["confidence"] == 0.95


def test_the_plot_has_kl_and_top1_points_against_bytes(own_run: Path) -> None:
    report = json.loads((own_run / "report.json").read_text())
    fig = plot_figure(report)
    (kl_axes,) = [ax for ax in fig.axes if "KL" in ax.get_ylabel()]
    (top1_axes,) = [ax for ax in fig.axes if "top-1" in ax.get_ylabel()]
    sizes = [row["stored_bytes"] / 2**20 for row in report["rows"]]
    for ax, key in ((kl_axes, "kl"), (top1_axes, "top1")):
        (line,) = [ln for ln in ax.get_lines() if ln.get_marker() in ("o", "s")]  # the points
        xs, ys = list(line.get_xdata()), list(line.get_ydata())
        assert xs == pytest.approx(sizes) and all(math.isfinite(y) for y in ys), key
        assert ax.collections, f"{key}: no error bars"
    low, high = kl_axes.get_ylim()
    assert high - low > 0.01 and high > max(row["scores"]["kl"] for row in report["rows"])
    assert (own_run / "retention_vs_size.png").stat().st_size > 10_000
