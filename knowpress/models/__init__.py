"""Model loading and saving (safetensors only) and stored-size accounting."""

from knowpress.models.io import (
    atomic_dir,
    load_model,
    parameter_count,
    save_model,
    stored_bytes,
)

__all__ = ["atomic_dir", "load_model", "parameter_count", "save_model", "stored_bytes"]
