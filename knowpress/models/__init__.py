"""Model loading and saving (safetensors only), artifact manifests and size accounting."""

from knowpress.models.artifact import stored_bytes
from knowpress.models.io import atomic_dir, load_model, save_model
from knowpress.models.sizes import bf16_bytes, parameter_count

__all__ = [
    "atomic_dir",
    "bf16_bytes",
    "load_model",
    "parameter_count",
    "save_model",
    "stored_bytes",
]
