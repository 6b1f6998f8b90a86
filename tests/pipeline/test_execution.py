"""What a run computes on: ``compute_dtype: auto``, ``evaluate.batch_size: auto``, the
reference released before stages (kl compares with its states as stored) and offload."""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from knowpress.core.device import resolve_compute_dtype
from knowpress.core.errors import KnowpressError
from knowpress.evaluate.evaluator import evaluate_reference, evaluate_runtime
from knowpress.evaluate.states import read_states, write_states
from knowpress.evaluate.text import TextSpec, TextWorld, load_texts
from knowpress.pipeline import execution
from knowpress.pipeline.execution import resolve_recipe
from knowpress.pipeline.recipe import Recipe, validate_recipe
from knowpress.pipeline.runner import Runner, apply
from knowpress.pipeline.sources import resolve_source
from knowpress.runtimes import batching
from knowpress.runtimes.batching import halve_until_fits, pick_batch_size
from knowpress.runtimes.torch import TorchRuntime
from knowpress.testing.models import tiny_llama, tiny_tokenizer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
OLD_GPU = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()


def recipe(**changes: Any) -> Recipe:
    data: dict[str, Any] = {
        "version": 1,
        "model": {"world": "test-tiny"},
        "stages": [{"kind": "quantize", "method": {"name": "rtn", "bits": 8, "group_size": 32}}],
        "evaluate": {"tasks": ["kl", "recall"], "max_items": 6},
    }
    data.update(changes)
    return validate_recipe(data)


# --- compute_dtype: auto ---------------------------------------------------------------


def test_auto_compute_dtype_is_float32_on_cpu_and_bfloat16_on_cuda() -> None:
    assert resolve_compute_dtype("auto", CPU) == "float32"
    assert resolve_compute_dtype("auto", CUDA) == ("float16" if OLD_GPU else "bfloat16")
    assert resolve_compute_dtype("auto", torch.device("cuda:1")) != "float32"
    for explicit in ("float32", "bfloat16", "float16"):  # an explicit value is kept
        assert resolve_compute_dtype(explicit, CPU) == explicit
        assert resolve_compute_dtype(explicit, CUDA) == explicit
    with pytest.raises(KnowpressError) as error:
        resolve_compute_dtype("int8", CPU)
    assert str(error.value) == (
        "model.compute_dtype: 'int8' is not a compute dtype (use auto, float32, bfloat16, float16)"
    )


def test_a_recipe_resolves_once_and_auto_sources_follow_the_model(tiny_teacher_dir: Path) -> None:
    folder = {"path": str(tiny_teacher_dir)}
    plain = recipe(teacher=folder, reference={**folder, "compute_dtype": "float16"})
    assert plain.model.compute_dtype == "auto"  # the default
    on_cuda = resolve_recipe(plain, CUDA)
    bf16 = "float16" if OLD_GPU else "bfloat16"
    assert (on_cuda.model.compute_dtype, on_cuda.teacher.compute_dtype) == (bf16, bf16)
    assert on_cuda.reference.compute_dtype == "float16"  # explicit: kept
    on_cpu = resolve_recipe(plain, CPU)
    assert (on_cpu.model.compute_dtype, on_cpu.teacher.compute_dtype) == ("float32", "float32")
    explicit = resolve_recipe(recipe(model={"world": "test-tiny", "compute_dtype": "bfloat16"},
                                     teacher=folder), CPU)  # fmt: skip
    assert explicit.teacher.compute_dtype == "bfloat16"  # the teacher follows the model
    # cache keys carry the dtype that runs, not "auto"
    keys = {resolve_source(r.teacher).key for r in (on_cpu, on_cuda, plain)}
    assert len(keys) == 3
    # a source loaded outside a run (Delta-KD bases): auto follows the run's dtype
    model, _ = resolve_source(plain.teacher).load("cpu", follow="bfloat16")
    assert model.dtype == torch.bfloat16
    model, _ = resolve_source(plain.teacher).load("cpu")
    assert model.dtype == torch.float32


# --- evaluate.batch_size: auto ----------------------------------------------------------


def test_halving_on_out_of_memory() -> None:
    tried: list[int] = []

    def attempt(size: int) -> None:
        tried.append(size)
        if size > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    assert halve_until_fits(64, attempt) == 8 and tried == [64, 32, 16, 8]

    def never(size: int) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    assert halve_until_fits(64, never) == 0


def _available(monkeypatch: pytest.MonkeyPatch, rows: int, runtime: TorchRuntime, n: int) -> None:
    """psutil reports the memory ``rows`` sequences of ``n`` tokens take (at the estimate)."""
    import psutil

    config = runtime.model.config.get_text_config(decoder=True)
    per_row = batching.row_bytes(config, n, runtime.model.dtype.itemsize)
    free = int(rows * per_row / batching.CPU_SHARE) + 1
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=free))


def test_cpu_batch_size_from_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = TorchRuntime(tiny_llama(seed=0, vocab_size=60), tiny_tokenizer(60))
    _available(monkeypatch, 5, runtime, 256)
    choice = pick_batch_size(runtime, 256)
    assert choice.size == 5 and choice.how.startswith("auto: 5 on cpu, ~")
    _available(monkeypatch, 10_000, runtime, 256)
    assert pick_batch_size(runtime, 256).size == batching.AUTO_CAP
    _available(monkeypatch, 0, runtime, 256)
    assert pick_batch_size(runtime, 256).size == 1


def test_auto_batch_size_scores_exactly_as_the_size_it_picks(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    real = batching.row_bytes
    free = SimpleNamespace(available=0)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)

    def sized(config: Any, length: int, itemsize: int) -> int:  # 3 rows fit, whatever the box
        free.available = int(3 * real(config, length, itemsize) / batching.CPU_SHARE) + 1
        return real(config, length, itemsize)

    monkeypatch.setattr(batching, "row_bytes", sized)
    auto = apply(recipe(), tmp_path / "auto").report
    fixed = apply(recipe(evaluate={"tasks": ["kl", "recall"], "max_items": 6, "batch_size": 3}),
                  tmp_path / "fixed").report  # fmt: skip
    assert auto["execution"]["batch_size"] == 3
    assert auto["execution"]["batch_size_from"].startswith("auto: 3 on cpu")
    assert fixed["execution"]["batch_size_from"] == "evaluate.batch_size"
    assert auto["execution"]["compute_dtype"] == "float32"
    assert auto["execution"]["compute_dtype_from"] == "auto"
    for a, b in zip(auto["rows"], fixed["rows"], strict=True):
        assert a["scores"] == b["scores"] and a["items"] == b["items"]  # exactly
    text = (tmp_path / "auto" / "report.md").read_text()
    assert "- ran on cpu in float32 (auto); evaluated in batches of 3 (auto: 3 on cpu" in text


# --- the reference: released before stages, compared as stored ---------------------------


def _text_world(tmp_path: Path, vocab: int) -> TextWorld:
    words = [f"w{i}" for i in range(vocab - 4)]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(12)]
    (tmp_path / "notes.txt").write_text("\n\n".join(lines))
    return TextWorld(*load_texts(TextSpec(path=str(tmp_path / "notes.txt"))))


def test_kl_from_the_stored_states_equals_the_live_reference(tmp_path: Path) -> None:
    vocab = 60  # <= kl's TOP_K: the stored top-k is the reference's whole distribution
    world = _text_world(tmp_path, vocab)
    reference = TorchRuntime(tiny_llama(seed=0, vocab_size=vocab), tiny_tokenizer(vocab))
    model = TorchRuntime(tiny_llama(seed=1, vocab_size=vocab), tiny_tokenizer(vocab))
    _, states = evaluate_reference(reference, world, ["kl"], None)
    write_states(tmp_path / "states.safetensors", states)
    stored = read_states(tmp_path / "states.safetensors")
    assert stored is not None
    kl = states["kl"]
    # live: both models' full distributions on the very token ids the reference scored
    per_position = []
    for source in ("text", "continuation"):
        flat, first = kl[f"{source}/ids"].tolist(), int(kl[f"{source}/first"][0])
        offset = 0
        for n in kl[f"{source}/lengths"].tolist():
            ids = torch.tensor([flat[offset : offset + n]])
            offset += n
            with torch.no_grad():
                logp = torch.log_softmax(reference.model(ids).logits[0, :-1].double(), -1)
                logq = torch.log_softmax(model.model(ids).logits[0, :-1].double(), -1)
            per_position.append((logp.exp() * (logp - logq)).sum(-1)[first:])
    live = float(torch.cat(per_position).mean())
    del reference  # from here on only the stored states stand for it
    score = evaluate_runtime(model, world, ["kl"], None, None, stored)["kl"].score
    assert live > 0.01 and score == pytest.approx(live, abs=1e-6)


def test_the_reference_model_is_released_before_stages_run(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[weakref.ref[Any]] = []
    original_load = execution.load_runtime

    def load(location: str, **options: Any) -> Any:
        runtime = original_load(location, **options)
        loads.append(weakref.ref(runtime.model))
        return runtime

    seen: list[bool] = []
    original_stage = Runner._run_stage

    def stage(self: Runner, *args: Any, **kwargs: Any) -> Any:
        seen.append(loads[0]() is None)  # the reference's model, loaded first
        assert set(self.evaluation.states) == {"kl", "recall"}  # read back from the file
        return original_stage(self, *args, **kwargs)

    read: list[Path] = []
    original_read = read_states

    def reading(path: Path) -> Any:
        read.append(path)
        return original_read(path)

    monkeypatch.setattr(execution, "load_runtime", load)
    monkeypatch.setattr(Runner, "_run_stage", stage)
    monkeypatch.setattr(execution, "read_states", reading)
    apply(recipe(), tmp_path / "out")
    assert seen == [True] and len(loads) == 2  # the reference, then the stage's folder
    assert read[-1] == tmp_path / "out" / "reference" / "states.safetensors"


# --- evaluate.offload ---------------------------------------------------------------------


def _perturbed(folder: Path, out: Path) -> Path:
    from knowpress.formats.io import load_model, save_model

    model, tokenizer = load_model(folder)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    save_model(model, tokenizer, out, dtype=torch.float32)
    return out


def test_offloaded_to_disk_scores_the_same_kl(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from accelerate.utils import compute_module_sizes

    from knowpress.runtimes.loader import load_runtime
    from knowpress.testing import tiny_world

    world = tiny_world()
    reference = load_runtime(tiny_teacher_dir)
    _, states = evaluate_reference(reference, world, ["kl"], 6)
    del reference
    folder = _perturbed(tiny_teacher_dir, tmp_path / "perturbed")
    plain = load_runtime(folder)
    size = compute_module_sizes(plain.model)[""]
    expected = evaluate_runtime(plain, world, ["kl"], 6, None, states)["kl"].score
    del plain
    offloaded = load_runtime(folder, offload=True, max_memory={"cpu": size * 3 // 4})
    places = set(offloaded.model.hf_device_map.values())  # type: ignore[attr-defined]
    assert places == {"cpu", "disk"}  # some modules' weights stay on disk until they run
    assert "disk" in offloaded.describe()["offload"]
    score = evaluate_runtime(offloaded, world, ["kl"], 6, None, states)["kl"].score
    assert expected > 0.001 and score == pytest.approx(expected, abs=1e-5)
    with pytest.raises(KnowpressError, match=r"^evaluate.offload: not one module of the model "):
        load_runtime(folder, offload=True, max_memory={"cpu": 1})


def test_offload_in_a_run_scores_as_without_it(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accelerate.utils
    from accelerate.utils import compute_module_sizes

    from knowpress.formats.io import load_model

    plain = recipe(evaluate={"tasks": ["kl"], "max_items": 4})
    expected = apply(plain, tmp_path / "plain").report
    size = compute_module_sizes(load_model(tiny_teacher_dir)[0])[""]
    # a host that holds 3/4 of the reference: the rest waits on disk until it runs
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {"cpu": size * 3 // 4})
    evaluate = {"tasks": ["kl"], "max_items": 4, "offload": True}
    report = apply(recipe(evaluate=evaluate), tmp_path / "out").report
    assert report["execution"]["offload"] is True
    offload = [row["runtime"]["offload"] for row in report["rows"]]
    assert "on disk" in offload[0] and all("device_map auto" in o for o in offload)
    for a, b in zip(report["rows"], expected["rows"], strict=True):  # the int8 stage too
        assert a["scores"]["kl"] == pytest.approx(b["scores"]["kl"], abs=1e-5)
    assert expected["rows"][1]["scores"]["kl"] > 0
    assert "models offloaded with device_map auto" in (tmp_path / "out" / "report.md").read_text()
    export = recipe(evaluate=evaluate, stages=[{"kind": "export"}])
    with pytest.raises(KnowpressError, match=r"^evaluate.offload: stages.0 \(export\) is scored "):
        apply(export, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_distill_teacher_is_held_in_the_compute_dtype_the_student_trains_in_float32(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knowpress.pipeline.stages import distill

    held: list[tuple[torch.dtype, torch.dtype]] = []
    original = distill.Trainer

    def trainer(student: Any, teacher: Any, *args: Any) -> Any:
        held.append((next(student.parameters()).dtype, next(teacher.parameters()).dtype))
        return original(student, teacher, *args)

    teacher_held: list[tuple[bool, bool]] = []  # (at a stage's start, at its end)
    original_stage = Runner._run_stage

    def stage_run(self: Runner, *args: Any, **kwargs: Any) -> Any:
        before = self._teacher is not None
        record = original_stage(self, *args, **kwargs)
        teacher_held.append((before, self._teacher is not None))
        return record

    monkeypatch.setattr(distill, "Trainer", trainer)
    monkeypatch.setattr(Runner, "_run_stage", stage_run)
    stage = {"kind": "distill", "student": {"make": "depth", "keep": 0.5},
             "train": {"steps": 2, "batch_size": 4}}  # fmt: skip
    quantize = {"kind": "quantize", "method": {"name": "rtn", "bits": 8, "group_size": 32}}
    model = {"world": "test-tiny", "compute_dtype": "bfloat16"}
    evaluate = {"tasks": ["kl"], "max_items": 2}
    report = apply(recipe(model=model, stages=[stage, quantize], evaluate=evaluate),
                   tmp_path / "out").report  # fmt: skip
    assert held == [(torch.float32, torch.bfloat16)]  # never both float32
    # the teacher is loaded for the distill stage and dropped before the quantize stage
    assert teacher_held == [(False, True), (False, False)]
    assert report["execution"]["compute_dtype"] == "bfloat16"
    assert report["execution"]["compute_dtype_from"] == "model.compute_dtype"
    assert all(row["runtime"]["dtype"] == "bfloat16" for row in report["rows"])
