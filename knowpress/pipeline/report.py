"""The run report: ``report.json`` (versioned), ``report.md`` and ``retention_vs_size.png``.

``report.json`` (schema_version 3)::

    {"schema": "knowpress.pipeline.report", "schema_version": 3, "knowpress_version": str,
     "created_utc": str, "inputs": {"model", "reference", "teacher", "world"},
     "recipe": {...}, "reference_bf16_bytes": int,
     "execution": {"device", "compute_dtype", "compute_dtype_from", "offload", "batch_size",
                   "batch_size_from"} | null,
     "tasks": {name: {"metric", "higher_is_better", "relative", "chance": float|null,
                      "near_chance": bool}},
     "uncertainty": {"confidence", "resamples", "seed", "interval", "alpha", "power"},
     "warnings": [str],
     "rows": [{"name", "stage_index", "kind", "stored_bytes", "size_vs_bf16_reference",
               "parameters", "bits_per_parameter", "kv_bytes_per_token",
               "runtime": {"runtime", "device", "dtype", "kv_policy"},
               "scores": {task: float}, "retention": {task: float|null},
               "worst_task", "worst_retention", "details": {task: {"n", "extra", "examples"}},
               "items": {task: {"statistic", "columns": {column: [float]}}},
               "intervals": {task: {"score": [lo, hi]|null, "retention": [lo, hi]|null,
                                    "mde": float|null, "top1": [lo, hi] (kl)}},
               "paired": {task: {"n", "lost", "gained", "lost_share", "gained_share",
                                 "lost_interval", "gained_interval", "mcnemar_p"}},
               "compression": null | {"input_bytes", "input_kv_bytes_per_token",
                                      "flag": "grew"|"unchanged"|null, "note"}}],
     "stages": [StageRecord...], "gate": GateResult | null}

Row 0 is the reference (retention 1 by definition); then one row per stage. ``stored_bytes``
is the artifact's payload on disk (``formats/manifest.py``); ``size_vs_bf16_reference`` divides
it by the reference's safetensors with every float tensor in bfloat16 (what is deployed,
``reference_bf16_bytes``); ``bits_per_parameter`` = 8 · stored bytes / logical parameters;
``kv_bytes_per_token`` is measured on the runtime's cache (its KV policy, or the full cache);
``runtime`` says on which device and in which dtype the row was measured (and ``offload``,
how an offloaded model was spread: ``runtimes/offload.py``); ``execution`` what the run
computed on (``pipeline/execution.py``: the compute dtype ``auto`` resolved to, the
evaluation's batch size and how it was picked, offload). Tasks that are not
``relative`` (``kl``) have no retention; ``warnings`` say what makes the figures mean less
than they seem (a reference near chance on every world task, text the tokenizer hardly
knows, a compression stage that did not compress). ``near_chance``: the reference scored
below 2x the task's chance score, so its retention measures little: such a task is left out
of ``worst_task`` / ``worst_retention`` (and of a default gate) but still reported.
``items`` are the per-item results the intervals are computed from (``evaluate/intervals.py``:
seeded paired bootstrap, percentile intervals at ``uncertainty.confidence``; exact
Clopper-Pearson intervals and McNemar p for flips; ``mde`` the smallest retention drop the item
count detects at ``alpha`` and ``power``), kept so ``compress check`` can gate on intervals at
any confidence. ``compression`` (``shrinkage.py``) compares a compression stage with its
input. A row with a ``bits`` score gets ``details.bits.extra.bits_per_stored_byte``. Schemas
1 (before the artifact manifest) and 2 (before items and intervals) are read for gating;
gating them on intervals is refused in one line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from knowpress.core.io import atomic_write_text
from knowpress.evaluate import uncertainty
from knowpress.evaluate.evaluator import Measurement, TaskScore, retention_table, worst
from knowpress.evaluate.gate import check
from knowpress.evaluate.intervals import record_of, row_uncertainty
from knowpress.evaluate.text import world_record
from knowpress.formats.sizes import bits_per_parameter
from knowpress.pipeline.context import StageRecord
from knowpress.pipeline.recipe import Recipe
from knowpress.pipeline.report_schema import (
    READABLE_VERSIONS,
    REQUIRED_KEYS,
    SCHEMA_VERSION,
    load_report,
)
from knowpress.pipeline.shrinkage import judge_rows, model_input, warning_lines

__all__ = [
    "READABLE_VERSIONS", "REQUIRED_KEYS", "SCHEMA_VERSION", "build_report", "load_report",
    "write_report",
]  # fmt: skip


def _clean(value: Any) -> Any:
    """NaN/inf -> None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def knowpress_version() -> str:
    try:
        return version("knowpress")
    except PackageNotFoundError:
        return "unknown"


def _row(
    name: str,
    record: StageRecord | None,
    measurement: Measurement,
    reference: Measurement,
    reference_bf16_bytes: int,
    tasks: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    scores, size = measurement.scores, measurement.stored_bytes
    retention = retention_table(scores, reference.scores)
    near = {t for t, info in tasks.items() if info["near_chance"]}
    worst_task, worst_value = worst(retention, skip=near)
    items = {t: record_of(s) for t, s in scores.items()}
    ref_items = {t: record_of(s) for t, s in reference.scores.items()}
    intervals, paired = row_uncertainty(items, ref_items, tasks)
    return {
        "name": name,
        "stage_index": None if record is None else record.index,
        "kind": None if record is None else record.kind,
        "stored_bytes": size,
        "size_vs_bf16_reference": size / reference_bf16_bytes,
        "parameters": measurement.parameters,
        "bits_per_parameter": bits_per_parameter(size, measurement.parameters),
        "kv_bytes_per_token": measurement.kv_bytes_per_token,
        "runtime": measurement.runtime,
        "scores": {t: s.score for t, s in scores.items()},
        "retention": retention,
        "worst_task": worst_task,
        "worst_retention": worst_value,
        "details": {
            t: {"n": s.n, "extra": _extra(t, s, size), "examples": s.examples}
            for t, s in scores.items()
        },
        "items": {t: r for t, r in items.items() if r is not None},
        "intervals": intervals,
        "paired": paired,
        "compression": None,
    }


def _extra(task: str, score: TaskScore, size: int) -> dict[str, float]:
    """The task's extra metrics, plus bits per stored byte for ``bits`` (needs the size)."""
    if task != "bits" or size <= 0:
        return score.extra
    return {**score.extra, "bits_per_stored_byte": score.score / size}


def build_report(
    *,
    recipe: Recipe,
    inputs: dict[str, str],
    world: Any,
    reference: Measurement,
    reference_bf16_bytes: int,
    stages: list[tuple[StageRecord, Measurement]],
    execution: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a run: the reference row, then one row per stage (see module doc)."""
    tasks = {
        t: {
            "metric": s.metric,
            "higher_is_better": s.higher_is_better,
            "relative": s.relative,
            "chance": s.chance,
            "near_chance": s.near_chance,
        }
        for t, s in reference.scores.items()
    }
    rows = [_row("reference", None, reference, reference, reference_bf16_bytes, tasks)]
    for record, measurement in stages:
        name = Path(record.checkpoint).name
        rows.append(_row(name, record, measurement, reference, reference_bf16_bytes, tasks))
    kinds = [record.kind for record, _ in stages]
    verdicts = judge_rows(rows, kinds, model_input(inputs, recipe.model, rows))
    for row, verdict in zip(rows[1:], verdicts, strict=True):
        row["compression"] = verdict
    report: dict[str, Any] = {
        "schema": "knowpress.pipeline.report",
        "schema_version": SCHEMA_VERSION,
        "knowpress_version": knowpress_version(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {**inputs, "world": world_record(world)},
        "recipe": recipe.dump(),
        "reference_bf16_bytes": reference_bf16_bytes,
        "execution": execution,
        "tasks": tasks,
        "uncertainty": UNCERTAINTY,
        "rows": rows,
        "stages": [dataclasses.asdict(r) for r, _ in stages],
        "gate": None,
    }
    report["warnings"] = warnings(report)
    gate = recipe.gate
    if gate is not None:
        result = check(
            report, gate.min_retention, gate.tasks, max_kl=gate.max_kl, min_top1=gate.min_top1,
            confidence=gate.confidence, strict=gate.strict,
            allow_no_compression=gate.allow_no_compression,
        )  # fmt: skip
        report["gate"] = result.to_json()
    return _clean(report)


UNCERTAINTY = {
    "confidence": uncertainty.CONFIDENCE,
    "resamples": uncertainty.RESAMPLES,
    "seed": uncertainty.SEED,
    "interval": "percentile bootstrap over items (kl: over its text windows and "
    "continuations), paired with the reference's items for retention; exact Clopper-Pearson "
    "for QA flips",
    "alpha": uncertainty.ALPHA,
    "power": uncertainty.POWER,
}


UNKNOWN_SHARE_WARNING = 0.10


def warnings(report: dict[str, Any]) -> list[str]:
    """What makes the figures mean less than they seem, said once at the top of the report."""
    out = []
    tasks = report["tasks"]
    world_tasks = [t for t, info in tasks.items() if info.get("chance") is not None]
    if world_tasks and all(tasks[t]["near_chance"] for t in world_tasks):
        out.append(
            f"the reference is near chance on every world task ({', '.join(world_tasks)}): this "
            f"world measures nothing it knows; score it on your own text instead: "
            f"evaluate: {{tasks: [kl], text: {{path: notes.txt}}}}"
        )
    out += _near_chance_lines(tasks)
    perplexity = report["rows"][0]["details"].get("perplexity")
    share = (perplexity or {}).get("extra", {}).get("unknown_share", 0.0)
    if share > UNKNOWN_SHARE_WARNING:
        out.append(
            f"{share:.0%} of the held-out text's tokens are unknown to the tokenizer (<unk>): "
            f"perplexity leaves them out, and the text hardly fits this model; use kl on text "
            f"in its language"
        )
    return out + warning_lines(report["rows"], report["stages"])


def _near_chance_lines(tasks: dict[str, dict[str, Any]]) -> list[str]:
    """A line naming the relative tasks near chance: left out of the worst-task figure."""
    near = [t for t, info in tasks.items() if info.get("near_chance") and info["relative"]]
    if not near:
        return []
    return [
        f"the reference is near chance on {', '.join(near)}: left out of the worst-task "
        f"figure and of a default gate (still reported)"
    ]


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    from knowpress.pipeline.render import render_markdown, render_plot

    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    render_plot(report, out_dir / "retention_vs_size.png")
