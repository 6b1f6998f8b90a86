"""``compress export MODEL -o OUT``: the ``kind: export`` stage on any model folder (a stage
folder, a teacher, a user's model): the edge bundle with a manifest of format ``onnx``, the
folder's KV policy carried, parity gated, written atomically."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from knowpress.errors import KnowpressError


def add_parser(sub: Any, common: Any) -> None:
    p = sub.add_parser("export", parents=[common], help="export a model folder to an ONNX bundle")
    p.add_argument("model", help="model folder (a stage folder, a teacher, an HF folder)")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument("--weights", choices=["float32", "int4", "int8"], default="int4")
    p.add_argument("--block-size", type=int, default=32, help="int4 block (re-quantized linears)")
    p.add_argument("--asymmetric", action="store_true", help="int4 with zero points")
    p.add_argument("--accuracy-level", type=int, choices=range(5), default=4)
    p.add_argument("--ignore", default="lm_head", help="comma-separated globs kept float")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export)


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from knowpress.stages.export import ExportConfig

    try:
        return ExportConfig(
            kind="export", weights=args.weights, block_size=args.block_size,
            symmetric=not args.asymmetric, accuracy_level=args.accuracy_level,
            ignore=[g for g in args.ignore.split(",") if g],
        )  # fmt: skip
    except ValidationError as exc:
        error = exc.errors()[0]
        raise KnowpressError(f"--{error['loc'][0]}: {error['msg']}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from knowpress.cli import _quiet_libraries, err, out
    from knowpress.evaluate.loader import artifact_format, expert_skip_of, kv_policy_of
    from knowpress.export.pipeline import export_model
    from knowpress.models.artifact import build_manifest, write_manifest
    from knowpress.models.io import atomic_dir, load_model
    from knowpress.progress import Progress

    _quiet_libraries()
    config = _config(args)
    target = Path(args.output)
    if target.exists() and any(target.iterdir()) and not args.force:
        raise KnowpressError(f"{target} is not empty; pass --force to replace it")
    fmt, manifest = artifact_format(args.model)
    if fmt == "onnx":
        raise KnowpressError(f"{args.model} is already an ONNX bundle; export its input folder")
    policy = kv_policy_of(manifest, args.model)
    if expert_skip_of(manifest, args.model) is not None:
        raise KnowpressError(f"{args.model}: expert_skip cannot run in the onnxruntime loop")
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    progress = Progress(console=err, enabled=not args.quiet)
    with progress.session(), atomic_dir(target) as tmp:
        metrics = export_model(model, tokenizer, tmp, config, policy, progress)
        runtime = {} if policy is None else {"kv_policy": policy.model_dump(mode="json")}
        built = build_manifest(tmp, format="onnx", dtype="float32", runtime=runtime)
        write_manifest(tmp, built)
    out.print(
        f"{target}: {metrics['weights']}; {built.stored_bytes:,} bytes; parity max|Δlogits| "
        f"{metrics['parity_max_abs_logits']:.3g}, greedy equal {metrics['parity_greedy_equal']}"
    )
    return 0
