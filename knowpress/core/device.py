"""Devices: ``auto | cpu | cuda | cuda:N`` resolved once, with one clear line when unusable."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowpress.core.errors import KnowpressError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str, field: str = "device") -> torch.device:
    """``auto`` -> cuda when a GPU is usable, else cpu; ``cuda`` without one is an error.

    ``field`` names where the value came from (``device``, ``--device``) in the message.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        raise KnowpressError(
            f"{field}: {device!r} is not a device (use {DEVICE_CHOICES})"
        ) from None
    if target.type not in ("cpu", "cuda"):
        raise KnowpressError(f"{field}: {device!r} is not supported (use {DEVICE_CHOICES})")
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise KnowpressError(
                f"{field}: {device!r} asked for, but this torch sees no CUDA GPU "
                f"(torch {torch.__version__}); use {field} cpu or auto"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise KnowpressError(
                f"{field}: {device!r} asked for, but only {torch.cuda.device_count()} "
                f"GPU(s) are visible"
            )
    return target


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def resolve_compute_dtype(
    value: str, device: torch.device, field: str = "model.compute_dtype"
) -> str:
    """The dtype stages and evaluation compute in: ``auto`` -> ``bfloat16`` on cuda (``float16``
    on a GPU torch says has no bfloat16), ``float32`` on the CPU; an explicit value is kept.

    Resolved once, against the resolved ``device``; a bad value is one line naming ``field``.
    """
    import torch

    if value in COMPUTE_DTYPES:
        return value
    if value != "auto":
        choices = ", ".join(("auto", *COMPUTE_DTYPES))
        raise KnowpressError(f"{field}: {value!r} is not a compute dtype (use {choices})")
    if device.type != "cuda":
        return "float32"
    visible = torch.cuda.is_available()  # a GPU torch cannot see is checked by resolve_device
    return "float16" if visible and not torch.cuda.is_bf16_supported() else "bfloat16"
