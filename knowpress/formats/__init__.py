"""Model loading and saving (safetensors only), artifact manifests and size accounting."""

from knowpress.core.io import atomic_dir
from knowpress.formats.io import load_model, save_model
from knowpress.formats.manifest import stored_bytes
from knowpress.formats.sizes import bf16_bytes, parameter_count

__all__ = [
    "atomic_dir",
    "bf16_bytes",
    "load_model",
    "parameter_count",
    "save_model",
    "stored_bytes",
]
