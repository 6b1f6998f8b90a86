"""``load_runtime``: the runtime that scores an artifact, chosen by its format.

The artifact's format (``formats.detect``: its manifest's, else its files') names a runtime
in :data:`RUNTIMES` (``torch``: a ``TorchRuntime`` of the model the format loads; ``onnxruntime``:
``runtimes/ort.OrtRuntime``; ``torch-gguf``: ``runtimes/gguf.GGUFRuntime``, a GGUF file's
dequantized tensors in PyTorch); the manifest's ``runtime`` section restores the attached
policies by slot (``kv_policy`` -> ``methods/kv``). The runner and ``compress eval`` load
every model they score through here, so an artifact is measured as it will be deployed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowpress.core.errors import KnowpressError
from knowpress.core.registry import Registry
from knowpress.formats.manifest import MANIFEST_FILE, Manifest

if TYPE_CHECKING:
    from knowpress.methods.kv.base import KVPolicy
    from knowpress.runtimes.torch import Runtime

RUNTIME_SLOTS = ("kv_policy", "expert_skip")


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 64
    trust_remote_code: bool = False
    #: the dtype the deployed model holds float tensors (and its KV cache) in, for a folder
    #: without a manifest (a manifest's own ``dtype`` wins)
    deploy_dtype: str = "bfloat16"
    #: spread the model over the device, the CPU and disk (``runtimes/offload.py``; torch only)
    offload: bool = False
    #: with ``offload``: place -> bytes it may hold (default: what is free)
    max_memory: dict[Any, Any] | None = None


Loader = Callable[[str, "Manifest | None", RuntimeOptions], "Runtime"]
#: runtime name (``Format.runtime``) -> what builds it from an artifact
RUNTIMES: Registry[Loader] = Registry("runtime")


KNOWN_STRUCTURE = {"experts_per_layer"}  # what load_model restores (uneven MoE counts)


def kv_policy_of(manifest: Manifest | None, where: str) -> KVPolicy | None:
    """The KV policy a manifest attaches (None without one); unknown slots are errors."""
    if manifest is None:
        return None
    unknown = sorted(set(manifest.runtime) - set(RUNTIME_SLOTS))
    if unknown:
        raise KnowpressError(
            f"{where}: runtime policy {unknown[0]!r} is unknown to this knowpress "
            f"(it applies {', '.join(RUNTIME_SLOTS)}); upgrade knowpress to score this artifact"
        )
    data = manifest.runtime.get("kv_policy")
    if data is None:
        return None
    from knowpress.methods.kv import policy_from_json

    return policy_from_json(data, f"{where}: runtime.kv_policy")


def expert_skip_of(manifest: Manifest | None, where: str) -> Any:
    """The expert-skipping policy a manifest attaches (``methods/experts/skip.py``), or None."""
    data = manifest.runtime.get("expert_skip") if manifest is not None else None
    if data is None:
        return None
    from pydantic import ValidationError

    from knowpress.methods.experts.skip import ExpertSkip

    try:
        return ExpertSkip.model_validate(data)
    except ValidationError as exc:
        raise KnowpressError(f"{where}: runtime.expert_skip: {exc.errors()[0]['msg']}") from None


def _torch(location: str, manifest: Manifest | None, options: RuntimeOptions) -> Runtime:
    from knowpress.formats.io import load_model
    from knowpress.runtimes.torch import TorchRuntime

    where = str(Path(location) / MANIFEST_FILE)
    policy = kv_policy_of(manifest, where)
    unknown = sorted(set(manifest.structure) - KNOWN_STRUCTURE) if manifest is not None else []
    if unknown:
        raise KnowpressError(
            f"{where}: structure {unknown} needs a loader this knowpress "
            f"does not have; upgrade knowpress to score this artifact"
        )
    model, tokenizer = load_model(
        location,
        dtype=options.dtype,
        trust_remote_code=options.trust_remote_code,
        device="cpu" if options.offload else options.device,
    )
    if options.offload:
        from knowpress.runtimes.offload import offload

        offload(model, options.device, options.max_memory)
    kv_dtype = manifest.dtype if manifest is not None else options.deploy_dtype
    runtime = TorchRuntime(model, tokenizer, batch_size=options.batch_size, kv_policy=policy,
                           kv_dtype=kv_dtype)  # fmt: skip
    skip = expert_skip_of(manifest, where)
    if skip is not None:
        skip.attach(model)
        runtime.expert_skip = skip
    return runtime


RUNTIMES.register("torch")(_torch)


def _onnx(location: str, manifest: Manifest | None, options: RuntimeOptions) -> Runtime:
    from knowpress.runtimes.ort import load_onnx  # onnxruntime only when an ONNX row is scored

    return load_onnx(location, manifest, options)


RUNTIMES.register("onnxruntime")(_onnx)


def _gguf(location: str, manifest: Manifest | None, options: RuntimeOptions) -> Runtime:
    from knowpress.runtimes.gguf import load_gguf  # the gguf package only when a GGUF row is scored

    return load_gguf(location, manifest, options)


RUNTIMES.register("torch-gguf")(_gguf)


def load_runtime(location: str | Path, **options: Any) -> Runtime:
    """The runtime that scores the artifact at ``location`` (a folder or a hub id): its
    format (``formats.detect``: the manifest's, else its files') names the runtime.

    ``options``: ``device``, ``dtype`` (compute dtype), ``batch_size``, ``trust_remote_code``,
    ``deploy_dtype`` (KV bytes are counted in it when the folder has no manifest),
    ``offload`` and ``max_memory`` (a torch model spread over device, CPU and disk).
    """
    from knowpress.formats import detect

    fmt, manifest = detect(location)
    try:
        loader = RUNTIMES.get(fmt.runtime)
    except KnowpressError as exc:
        raise KnowpressError(f"{location}: {exc}; install what runs {fmt.name}") from None
    return loader(str(location), manifest, RuntimeOptions(**options))
