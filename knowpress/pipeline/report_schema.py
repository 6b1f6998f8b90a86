"""Reading a ``report.json`` back for the gate (``compress check``, ``--baseline``).

The schema below is a partial reader: it types the fields the gate reads and lets every
other field through (``extra="allow"``), so reports of older schema versions still load.
The typed fields are strict: a boolean is not a number (``retention: true`` is refused, not
read as 1.0), nor is a string (``"0.1"`` where a KL is expected); an integer is a number. A
report that mangles one is refused in one line naming the field (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from knowpress.core.errors import short

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
REQUIRED_KEYS = ("schema", "schema_version", "inputs", "recipe", "tasks", "rows", "stages", "gate")
Number = float | None


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _KLExtra(_Loose):
    top1: Number = None


class _KLDetail(_Loose):
    extra: _KLExtra


class _Details(_Loose):
    kl: _KLDetail | None = None


class _Items(_Loose):
    """Per-item results: a known statistic, the columns it reads, all of one length."""

    statistic: str
    columns: dict[str, list[float]]

    @model_validator(mode="after")
    def _readable(self) -> _Items:
        from knowpress.evaluate.uncertainty import COLUMNS

        if self.statistic not in COLUMNS:
            raise ValueError(f"statistic {short(self.statistic, 40)!r} is not one of "
                             f"{', '.join(COLUMNS)}")  # fmt: skip
        missing = [c for c in COLUMNS[self.statistic] if c not in self.columns]
        if missing:
            raise ValueError(f"columns: {self.statistic} needs {', '.join(missing)}")
        if len({len(values) for values in self.columns.values()}) > 1:
            raise ValueError("columns differ in length (one value per item in each)")
        return self


class _Compression(_Loose):
    flag: Literal["grew", "unchanged"] | None = None
    note: str | None = None


class _Row(_Loose):
    name: str
    retention: dict[str, Number]
    scores: dict[str, Number] = {}
    details: _Details = _Details()
    items: dict[str, _Items] = {}
    compression: _Compression | None = None


class _Task(_Loose):
    metric: str
    near_chance: bool = False
    higher_is_better: bool = True
    relative: bool = True


class _World(_Loose):
    key: str


class _Inputs(_Loose):
    world: _World


class _Gate(_Loose):
    min_retention: Number = None
    max_kl: Number = None
    min_top1: Number = None
    confidence: Number = None
    strict: bool = False
    allow_no_compression: bool = False


class _Schema(_Loose):
    """The fields the gate reads; a report missing or mangling one is refused in one line."""

    inputs: _Inputs
    gate: _Gate | None
    tasks: dict[str, _Task]
    rows: list[_Row] = Field(min_length=1)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate a report.json (schema keys, version and the fields the gate reads)."""
    from knowpress.core.errors import KnowpressError

    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.exists():
        raise KnowpressError(f"{path}: no such report (give OUT/report.json)")
    if not path.is_file():
        raise KnowpressError(f"{path}: not a regular file (give OUT/report.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise KnowpressError(f"{path}: not a text file (give OUT/report.json)") from None
    except json.JSONDecodeError as exc:
        raise KnowpressError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except RecursionError:
        raise KnowpressError(f"{path}: nested too deeply to be a report") from None
    missing = [k for k in REQUIRED_KEYS if k not in data] if isinstance(data, dict) else ["all"]
    if missing or data.get("schema") != "knowpress.pipeline.report":
        raise KnowpressError(f"{path}: not a knowpress report (missing {short(missing)})")
    given = data["schema_version"]
    if isinstance(given, bool) or not isinstance(given, int) or given not in READABLE_VERSIONS:
        raise KnowpressError(
            f"{path}: report schema_version {short(data['schema_version'], 40)} is not "
            f"supported (this knowpress reads {', '.join(map(str, READABLE_VERSIONS))}); "
            f"re-run the recipe"
        )
    try:
        _Schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise KnowpressError(f"{path}: {short(where, 80)}: {message}") from None
    return data
