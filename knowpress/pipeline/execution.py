"""What a run computes on, resolved once before anything is written, and said in the report.

- ``resolve_recipe``: ``model.compute_dtype: auto`` (the default) becomes bfloat16 on cuda and
  float32 on the CPU against the resolved device (``core/device.resolve_compute_dtype``); a
  reference's or teacher's ``auto`` follows the model's resolved dtype, so a distillation
  teacher is held in the student's compute dtype, and source keys (resume, the eval cache)
  carry the dtype that ran.
- ``Evaluation``: loads every runtime the run scores (reference and stages) with the compute
  dtype, ``evaluate.offload`` (``runtimes/offload.py``) and one batch size: ``evaluate.batch_size``,
  or with ``auto`` the one ``runtimes/batching.pick_batch_size`` picks on the first runtime
  loaded, for the longest sequence the tasks run (``evaluate.evaluator.longest_sequence``;
  harness tasks: the model's ``max_positions``), kept for every later row.
- ``Evaluation.reference``: the reference scored first (or read back from ``OUT/reference``
  on resume), its task states written to ``states.safetensors`` and read back from there, so
  every later row is compared with what is stored (``kl``: the reference's top-k
  log-probabilities per token, never a live reference model); its runtime is released before
  any stage runs. ``Evaluation.measure`` scores a stage's runtime against those states.
- ``Evaluation.execution()``: the report's ``execution`` section (device, compute dtype and
  where it came from, batch size and how it was picked, offload).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowpress.core.device import resolve_compute_dtype
from knowpress.core.errors import KnowpressError
from knowpress.core.io import atomic_write_text
from knowpress.core.measure import release_memory
from knowpress.evaluate.evaluator import (
    Measurement,
    evaluate_reference,
    evaluate_runtime,
    longest_sequence,
    measure,
)
from knowpress.evaluate.lm_eval_bridge import run_lm_eval
from knowpress.evaluate.states import STATES_FILE, read_states, write_states
from knowpress.runtimes.batching import AUTO_CAP, BatchChoice, pick_batch_size
from knowpress.runtimes.loader import load_runtime

if TYPE_CHECKING:
    import torch

    from knowpress.core.progress import Progress
    from knowpress.pipeline.recipe import Recipe
    from knowpress.pipeline.sources import Source
    from knowpress.runtimes.torch import Runtime

EVAL_FILE = "eval.json"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_recipe(recipe: Recipe, device: torch.device) -> Recipe:
    """``recipe`` with every ``compute_dtype: auto`` resolved (see module doc); offload with a
    stage whose artifact is not a torch model is refused in one line."""
    dtype = resolve_compute_dtype(recipe.model.compute_dtype, device)
    if recipe.evaluate.offload:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise KnowpressError(
                "evaluate.offload: needs the accelerate package (pip install accelerate, or "
                "the eval extra); set evaluate.offload: false"
            )
        for index, stage in enumerate(recipe.stages):
            if stage.kind == "export":
                raise KnowpressError(
                    f"evaluate.offload: stages.{index} (export) is scored on onnxruntime or its "
                    "GGUF file, which knowpress does not offload; set evaluate.offload: false"
                )

    def follow(spec: Any) -> Any:
        if spec is None:
            return None
        value = dtype if spec.compute_dtype == "auto" else spec.compute_dtype
        return spec.model_copy(update={"compute_dtype": value})

    specs = {name: follow(getattr(recipe, name)) for name in ("model", "reference", "teacher")}
    return recipe.model_copy(update=specs)


class Evaluation:
    """Loads the runtimes a run scores, with one batch size (see module doc)."""

    def __init__(
        self, recipe: Recipe, device: torch.device, asked_dtype: str, progress: Progress
    ) -> None:
        spec, model = recipe.evaluate, recipe.model
        self.spec, self.progress = spec, progress
        self.states: dict[str, Any] = {}  # task -> the reference's state, as stored
        self.tasks, self.harness = list(spec.tasks), spec.lm_eval is not None
        self.options = {
            "device": str(device),
            "dtype": model.compute_dtype,
            "trust_remote_code": model.trust_remote_code,
            "deploy_dtype": model.dtype,
            "offload": spec.offload,
        }
        fixed = spec.batch_size != "auto"
        self.batch: BatchChoice | None = (
            BatchChoice(int(spec.batch_size), "evaluate.batch_size") if fixed else None
        )
        self._record = {
            "device": str(device),
            "compute_dtype": model.compute_dtype,
            "compute_dtype_from": "auto" if asked_dtype == "auto" else "model.compute_dtype",
            "offload": spec.offload,
        }

    def load(self, location: str) -> Runtime:
        """The runtime of the artifact at ``location``, batched at the run's batch size (with
        ``auto``: picked here on the first runtime loaded)."""
        size = self.batch.size if self.batch is not None else AUTO_CAP
        runtime = load_runtime(location, batch_size=size, **self.options)
        if self.batch is None:
            positions = runtime.max_positions
            length = positions if self.harness else longest_sequence(self.tasks, positions)
            self.batch = pick_batch_size(runtime, length)
        runtime.batch_size = self.batch.size  # type: ignore[attr-defined]
        return runtime

    def measure(self, runtime: Runtime, world: Any, label: str, stored: int) -> Measurement:
        """``runtime`` scored on every task, compared with the reference's states."""
        spec = self.spec
        self.progress.log(f"[dim]evaluating {label} on {', '.join(spec.task_names())}[/dim]")
        scores = evaluate_runtime(
            runtime, world, spec.tasks, spec.max_items, self.progress, self.states
        )
        if spec.lm_eval is not None:
            scores.update(run_lm_eval(runtime, spec.lm_eval))
        return measure(runtime, scores, stored)

    def reference(
        self, source: Source, world: Any, folder: Path, key: str, resume: bool
    ) -> tuple[Measurement, int]:
        """The reference's measurement and its bytes in bf16, cached in ``folder`` under
        ``key``; ``self.states`` its task states as stored there."""
        cached = read_json(folder / EVAL_FILE) if resume else None
        states = read_states(folder / STATES_FILE)
        if cached and cached.get("key") == key and states is not None:
            self.states = states
            return Measurement.from_json(cached["measurement"]), int(cached["bf16_bytes"])
        runtime = self.load(source.location)
        spec = self.spec
        self.progress.log(f"[dim]evaluating reference on {', '.join(spec.task_names())}[/dim]")
        scores, states = evaluate_reference(
            runtime, world, spec.tasks, spec.max_items, self.progress
        )
        if spec.lm_eval is not None:
            scores.update(run_lm_eval(runtime, spec.lm_eval))
        measurement = measure(runtime, scores, source.stored_bytes())
        del runtime  # nothing else holds the reference model: released here
        release_memory()
        write_states(folder / STATES_FILE, states)
        del states
        stored = read_states(folder / STATES_FILE)  # later rows are compared with the file
        if stored is None:
            raise KnowpressError(f"{folder / STATES_FILE}: written but not readable back")
        self.states = stored
        bf16 = source.bf16_bytes()
        payload = {"key": key, "source": source.location, "bf16_bytes": bf16,
                   "measurement": measurement.to_json()}  # fmt: skip
        atomic_write_text(folder / EVAL_FILE, json.dumps(payload, indent=1))
        return measurement, bf16

    def execution(self) -> dict[str, Any]:
        """The report's ``execution`` section."""
        picked = self.batch or BatchChoice(0, "not picked: every row came from the cache")
        return {**self._record, "batch_size": picked.size or None, "batch_size_from": picked.how}
