"""``compress export MODEL -o OUT``: the ``kind: export`` stage on any model folder (a stage
folder, a teacher, a user's model): the edge bundle with a manifest of format ``onnx``, the
folder's KV policy carried, parity gated, written atomically; ``--format gguf``: a
``model.gguf`` for llama.cpp (manifest format ``gguf``; a folder carrying a KV policy other
than the full cache is refused: the file cannot hold one).

OUT follows the output-folder rules (``outdir.py``): an existing non-empty OUT needs
``--force``, which replaces only an earlier export bundle, and OUT is never the model folder,
a folder holding it or a folder inside it.
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import Any

from knowpress.core.errors import KnowpressError


def add_parser(sub: Any, common: Any, handler: Any) -> None:
    what = "export a model folder to an ONNX bundle or a GGUF file (needs the export extra)"
    p = sub.add_parser("export", parents=[common], help=what, description=what)
    p.add_argument("model", help="model folder (a stage folder, a teacher, an HF folder)")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument(
        "--format", choices=["onnx", "gguf"], default="onnx",
        help="onnx (default): an ONNX bundle for onnxruntime; gguf: model.gguf for llama.cpp "
        "(dense Llama-style models)",
    )  # fmt: skip
    p.add_argument(
        "--weights", choices=["float32", "int4", "int8", "q8_0", "q4_0", "q4_k"], default=None,
        help="onnx: int4 MatMulNBits (default), int8 dynamic quantization or float32; gguf: "
        "q4_0 (default), q8_0 or q4_k",
    )  # fmt: skip
    p.add_argument(
        "--block-size", type=int, default=None,
        help="onnx int4 block of the linears re-quantized here (default 32; a power of two "
        ">= 16)",
    )  # fmt: skip
    p.add_argument("--asymmetric", action="store_true", help="onnx int4 with zero points")
    p.add_argument(
        "--accuracy-level", choices=["0", "1", "2", "3", "4", "auto"], default=None,
        help="onnx MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fast on "
        "CPU); auto (default): 4, and 0 when parity fails at 4",
    )  # fmt: skip
    p.add_argument(
        "--ignore", default=None,
        help="onnx: comma-separated globs of linears kept float (default lm_head)",
    )  # fmt: skip
    p.add_argument(
        "--store", choices=["float32", "float16"], default=None,
        help="onnx: float tensors the graph keeps float stored float32 (default) or float16 "
        "(half the bytes, cast back in the graph)",
    )  # fmt: skip
    p.add_argument(
        "--force", action="store_true",
        help="replace an earlier export bundle at OUT (never another folder)",
    )  # fmt: skip
    from knowpress.cli.args import quiet_flag

    quiet_flag(p)
    p.set_defaults(func=handler)


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from knowpress.pipeline.stages.export import ExportConfig

    given = {
        "weights": args.weights,
        "block_size": args.block_size,
        "symmetric": False if args.asymmetric else None,
        "accuracy_level": None if args.accuracy_level is None else _level(args.accuracy_level),
        "ignore": None if args.ignore is None else [g for g in args.ignore.split(",") if g],
        "store": args.store,
    }  # only what was given: format gguf refuses the onnx-only options
    options = {k: v for k, v in given.items() if v is not None}
    try:
        return ExportConfig(kind="export", format=args.format, **options)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a combination: format and weights, onnx-only options
            raise KnowpressError(f"--format {args.format}: {message}") from None
        flag = str(error["loc"][0]).replace("_", "-")
        raise KnowpressError(f"--{flag}: {message}") from None


def _level(value: str) -> int | str:
    return value if value == "auto" else int(value)


def check_target(target: Path, model: Path, force: bool) -> None:
    """OUT may be written: not a file, not the model's folder (nor holding it, nor inside
    it), empty or absent unless ``--force`` replaces an earlier bundle."""
    from knowpress.pipeline.outdir import check_not_input, is_export_bundle

    if model.exists():
        check_not_input(target, {"the model folder": model})
    if target.exists() and not target.is_dir():
        raise KnowpressError(f"-o {target} is a file; give the folder to write the bundle to")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise KnowpressError(
            f"-o {target} is not empty; pass --force to replace an earlier export bundle there "
            f"(or choose another -o)"
        )
    if not is_export_bundle(target):
        raise KnowpressError(
            f"--force: {target} is not an export bundle (no export record and onnx or gguf "
            "manifest); "
            f"knowpress only replaces its own bundles, so empty it yourself or choose another -o"
        )


def cmd_export(args: argparse.Namespace) -> int:
    from knowpress.cli.app import err, out
    from knowpress.cli.quiet import hide_library_output
    from knowpress.core.errors import disk_full
    from knowpress.core.io import atomic_dir
    from knowpress.core.progress import Progress
    from knowpress.formats import detect
    from knowpress.formats.io import load_model
    from knowpress.formats.manifest import build_manifest, write_manifest
    from knowpress.pipeline.export import export_model
    from knowpress.pipeline.stages.export import refuse_policies
    from knowpress.runtimes.loader import expert_skip_of, kv_policy_of

    hide_library_output()
    config = _config(args)
    target = Path(args.output)
    check_target(target, Path(args.model), args.force)
    fmt, manifest = detect(args.model)
    if fmt.runtime != "torch":
        raise KnowpressError(
            f"{args.model} is already an exported {fmt.name} artifact; export its input folder"
        )
    policy = kv_policy_of(manifest, args.model)
    skip = expert_skip_of(manifest, args.model)
    if config.format == "gguf":
        try:
            refuse_policies({"kv_policy": policy, "expert_skip": skip})
        except KnowpressError as exc:
            raise KnowpressError(f"{args.model}: {exc}") from None
    elif skip is not None:
        raise KnowpressError(f"{args.model}: expert_skip cannot run in the onnxruntime loop")
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    if config.format == "gguf":
        from knowpress.formats.gguf.writer import check_model

        check_model(model.config.get_text_config(decoder=True))
    progress = Progress(console=err, enabled=not args.quiet)
    try:
        with progress.session(), atomic_dir(target) as tmp:
            if config.format == "gguf":
                from knowpress.pipeline.export_gguf import export_gguf

                metrics = export_gguf(model, tokenizer, tmp, config, progress)
                built = build_manifest(tmp, format="gguf", dtype="float32")
            else:
                metrics = export_model(model, tokenizer, tmp, config, policy, progress)
                runtime = {} if policy is None else {"kv_policy": policy.model_dump(mode="json")}
                built = build_manifest(tmp, format="onnx", dtype="float32", runtime=runtime)
            write_manifest(tmp, built)
    except Exception as exc:  # ENOSPC as onnx / protobuf / safetensors report it
        if disk_full(exc):
            raise OSError(errno.ENOSPC, "No space left on device", str(target)) from None
        raise
    vs_input = ""
    if config.format == "gguf":
        vs_input = (
            f"; vs the input model max|Δlogits| {metrics['quantization_max_abs_logits']:.3g} "
            f"(rel {metrics['quantization_max_rel_logits']:.3g})"
        )
    out.print(
        f"{target}: {metrics['weights']}; {built.stored_bytes:,} bytes; parity max|Δlogits| "
        f"{metrics['parity_max_abs_logits']:.3g}, greedy equal {metrics['parity_greedy_equal']}"
        + vs_input
    )
    return 0
