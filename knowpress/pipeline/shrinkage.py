"""Did each compression stage compress? A stage row is compared with its input.

A stage of a kind in ``COMPRESSING_KINDS`` compresses when its stored bytes are below its
input's, or its KV bytes per token are. Otherwise the row is flagged: ``grew`` (more stored
bytes and no smaller KV cache: a ``distill`` student larger than its teacher; or the same bytes
and a larger KV cache: a ``compress_kv`` at a larger budget than the one before it) or
``unchanged`` (same stored bytes and KV bytes per token: a ``compress_kv`` budget above any
context it is measured on). The report says so in a warning line and a row flag, and a gate
fails on a flagged row unless the recipe sets ``gate: {allow_no_compression: true}``.

The input of stage ``k > 0`` is the row before it (already in the deploy dtype). The input of
the first stage is the recipe's model, sized as the run deploys it: its safetensors with every
float tensor in the deploy dtype (integer tensors as stored) plus any other payload file its
manifest counts, so a float32 teacher saved in bfloat16 is not taken for compression. Its KV
bytes per token are the reference row's when the model is the reference, else unknown (then
only a growth in bytes, or equal bytes without a KV policy on the row, is flagged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: stage kinds whose purpose is fewer stored bytes or a smaller KV cache (others -- export,
#: recalibrate_routers, skip_experts -- convert, repair or save compute and are not judged)
COMPRESSING_KINDS = frozenset({"quantize", "distill", "prune_experts", "compress_kv"})
_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_FLOATS = {"F64", "F32", "F16", "BF16"}
_SAME_KV = 1e-6  # relative: KV bytes per token closer than this count as the same


def deployed_bytes(folder: Path, dtype: str) -> int:
    """The folder's payload with its float tensors stored in ``dtype`` (see the module doc)."""
    from knowpress.formats.manifest import stored_bytes
    from knowpress.formats.sizes import read_header, safetensors_bytes, safetensors_files

    tag, total, on_disk = _TAGS.get(dtype, "BF16"), 0, 0
    for file in safetensors_files(folder):
        header = read_header(file)
        entries = [
            (name, tag if info["dtype"] in _FLOATS else info["dtype"], tuple(info["shape"]))
            for name, info in header.items()
        ]
        total += safetensors_bytes(entries)
        on_disk += file.stat().st_size
    return total + max(stored_bytes(folder) - on_disk, 0)


def model_input(inputs: dict[str, str], spec: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"bytes", "kv_bytes_per_token"}`` of the first stage's input (None where unknown)."""
    from knowpress.core.errors import KnowpressError
    from knowpress.pipeline.sources import Source

    try:
        folder = Source(inputs["model"], "", spec).folder()
        size: int | None = deployed_bytes(folder, spec.dtype)
    except (KnowpressError, OSError, ValueError):  # e.g. a hub id not in the cache: unknown
        size = None
    same = inputs.get("model") == inputs.get("reference")
    return {"bytes": size, "kv_bytes_per_token": rows[0]["kv_bytes_per_token"] if same else None}


def judge(row: dict[str, Any], kind: str, given: dict[str, Any]) -> dict[str, Any] | None:
    """The row's ``compression`` entry: its input's bytes and KV bytes per token, and a
    ``flag`` (``grew`` / ``unchanged``, None when it compressed) with a ``note``; None for a
    kind that is not judged."""
    if kind not in COMPRESSING_KINDS:
        return None
    size, kv = row["stored_bytes"], row["kv_bytes_per_token"]
    in_size, in_kv = given["bytes"], given["kv_bytes_per_token"]
    out = {"input_bytes": in_size, "input_kv_bytes_per_token": in_kv, "flag": None, "note": None}
    fewer_bytes = in_size is not None and size < in_size
    kv_known = in_kv is not None and kv is not None
    smaller_kv = kv_known and kv < in_kv * (1 - _SAME_KV)
    if fewer_bytes or smaller_kv or in_size is None:
        return out
    larger_kv = kv_known and kv > in_kv * (1 + _SAME_KV)
    if larger_kv:  # a later compress_kv of a sweep at a larger budget than the row before
        same_kv = f"a larger KV cache ({kv:,.1f} vs {in_kv:,.1f} bytes/token)"
    else:
        same_kv = "the same KV bytes/token" if kv_known else "KV bytes/token not compared"
    if size > in_size:
        out["flag"] = "grew"
        out["note"] = (
            f"{size / in_size:.2f}x its input's stored bytes ({size:,} vs {in_size:,}), {same_kv}"
        )
    elif larger_kv:
        out["flag"] = "grew"
        out["note"] = f"the same stored bytes as its input ({size:,}), {same_kv}"
    elif kv_known or not (row.get("runtime") or {}).get("kv_policy"):
        out["flag"] = "unchanged"
        out["note"] = f"the same stored bytes as its input ({size:,}), {same_kv}"
    return out


def judge_rows(
    rows: list[dict[str, Any]], kinds: list[str], first_input: dict[str, Any]
) -> list[dict[str, Any] | None]:
    """``judge`` for every stage row (``rows[1:]``), each against its input."""
    out = []
    given = first_input
    for row, kind in zip(rows[1:], kinds, strict=True):
        out.append(judge(row, kind, given))
        given = {"bytes": row["stored_bytes"], "kv_bytes_per_token": row["kv_bytes_per_token"]}
    return out


def warning_lines(rows: list[dict[str, Any]], stages: list[dict[str, Any]]) -> list[str]:
    """One warning per flagged row, for the report's ``warnings``."""
    lines = []
    for row, stage in zip(rows[1:], stages, strict=True):
        flag = (row.get("compression") or {}).get("flag")
        if flag:
            lines.append(
                f"stage {stage['index'] + 1} ({stage['kind']}) did not compress ({flag}): "
                f"{row['compression']['note']}; a gate fails on it unless "
                f"gate.allow_no_compression is true"
            )
    return lines
