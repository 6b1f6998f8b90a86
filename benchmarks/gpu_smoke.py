"""The GPU smoke run's steps, their timeouts and the one JSON they write
(``benchmarks/gpu_smoke.sh`` checks for a GPU, picks or makes the Python environment and calls
``run``; the other subcommands are the steps it starts as child processes).

``run`` schedules the steps (each a child process with its own timeout, killed with its
process group when it runs past it, every timeout clipped to the run's deadline):

    install            missing knowpress dependencies, onnxruntime -> onnxruntime-gpu
    teacher/*          compress world build --preset P --device cuda (built, or loaded from
                       $KNOWPRESS_CACHE = .gpu-cache)            (the two in parallel)
    install/tensorrt   the tensorrt wheel, beside the teachers
    scale/llama-1b     benchmarks/scale.py --sizes llama-1b --device cuda, beside them
    apply/*            compress apply RECIPE --device cuda, once its teacher is there
    export/float32     compress export of the dense teacher, weights float32
    onnxruntime        that bundle (and the edge recipe's int4 bundle) on the CUDA and the
                       CPU execution providers: same feeds, max |Δlogits|
    tensorrt           an engine from the float32 graph, its logits against onnxruntime's

Every figure in the JSON is read from what a step wrote (report.json, the teacher's world
file, the parity JSONs) or measured around it (wall seconds, exit code, peak GPU memory of
torch's allocator in the step's process); a step that could not run says why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve()
SCHEMA = "knowpress-gpu-smoke/1"
TAIL = 1500  # characters of a step's output kept in the JSON
NOT_SELECTED = "not selected (--only)"
INSTALL_S = 120  # the install step's pip calls, all together
TENSORRT_INSTALL_S = 200  # install/tensorrt's, beside the teacher builds
RESERVE_S = 20  # kept back from the deadline for the JSON (an environment probe, nvidia-smi)

#: modules knowpress (core + export extra) imports -> what pip installs when one is missing
REQUIREMENTS = {
    "pydantic": "pydantic>=2.7,<3",
    "platformdirs": "platformdirs>=4",
    "compressed_tensors": "compressed-tensors>=0.20,<0.21",
    "transformers": "transformers>=5.0,<5.24",
    "tokenizers": "tokenizers>=0.21",
    "safetensors": "safetensors>=0.4",
    "yaml": "PyYAML>=6.0",
    "rich": "rich>=13",
    "matplotlib": "matplotlib>=3.8",
    "numpy": "numpy>=1.26",
    "scipy": "scipy>=1.11",
    "psutil": "psutil",
    "accelerate": "accelerate>=1.0",
    "onnx": "onnx>=1.17",
    "onnxscript": "onnxscript>=0.3",
    "gguf": "gguf>=0.19,<0.20",
}

#: needed by every step (the rest: the export steps, which say so when one is missing)
CRITICAL = ("pydantic", "platformdirs", "compressed_tensors", "transformers", "tokenizers",
            "safetensors", "yaml", "rich", "matplotlib", "numpy", "scipy", "psutil")  # fmt: skip

#: presets the recipes name (tiny: see ``CHOICE``)
DENSE, MOE = "bios-dense-tiny", "bios-moe-tiny"
CHOICE = (
    "tiny presets (bios-dense-tiny, bios-moe-tiny: the ones the recipes name). The small "
    "presets train 6000-10000 steps at 512 positions (4 layers, h192; bios-moe-small took 107 "
    "min on two CPU threads), estimated at 2-4 min each on one H100 before any recipe runs: "
    "with five recipes, the 1 B scale point and a TensorRT engine that does not fit in 8 minutes."
)

KV_RECIPE = """\
# GPU smoke: a KV-cache policy on the tiny teacher (SnapKV, a quarter of the tokens kept)
version: 1
model: {world: bios-dense-tiny}
reference: same
stages:
  - kind: compress_kv
    policy: {name: snapkv, window: 16}
    budget: 0.25
evaluate:
  tasks: [recall, perplexity, kl]
"""

#: name -> (recipe file, teacher preset, timeout s)
RECIPES = {
    "quickstart": ("recipes/quickstart.yaml", DENSE, 150),
    "distill-int4": ("recipes/distill-int4.yaml", DENSE, 180),
    "edge": ("recipes/edge.yaml", DENSE, 180),
    "kv-snapkv": (None, DENSE, 150),
    "moe": ("recipes/moe.yaml", MOE, 180),
}


def tail(text: str, n: int = TAIL) -> str:
    return text[-n:]


def now() -> float:
    return time.time()


# ---------------------------------------------------------------- child processes


def run_process(argv: list[str], timeout: float, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``argv`` in its own process group, output to ``log``; past ``timeout`` the group
    gets SIGTERM, then SIGKILL 10 s later. Exit code, wall seconds, whether it timed out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = now()
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            return {"exit_code": None, "wall_s": 0.0, "timed_out": False, "error": str(exc)}
        timed_out = False
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = proc.returncode
    text = log.read_text(errors="replace") if log.exists() else ""
    return {
        "exit_code": code,
        "wall_s": round(now() - start, 2),
        "timed_out": timed_out,
        "log_tail": tail(text),
    }


def peak_record(path: Path) -> None:
    """Write torch's peak GPU allocation in this process to ``path`` (when torch used CUDA)."""
    torch = sys.modules.get("torch")
    record: dict[str, Any] = {"torch_peak_gpu_bytes": None}
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        record["torch_peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    path.write_text(json.dumps(record))


def cmd_cli(args: argparse.Namespace) -> int:
    """``compress ARGS`` in this process (as the console script runs it), then its peak."""
    sys.argv = ["compress", *args.rest]
    code = 3
    try:
        from knowpress.cli.app import main

        code = int(main())
    except ImportError as exc:  # a dependency the install step could not bring
        print(f"knowpress cannot be imported here: {exc}", file=sys.stderr)
    finally:
        peak_record(Path(args.peak))
    return code


def cmd_pyrun(args: argparse.Namespace) -> int:
    """A Python script with its arguments in this process (``runpy``), then its peak."""
    script = Path(args.rest[0])
    if not script.is_file():
        print(f"{script}: no such script here", file=sys.stderr)
        return 127
    sys.argv = [str(script), *args.rest[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    code: Any = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        peak_record(Path(args.peak))
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


# ---------------------------------------------------------------- parity steps


def _feeds(session: Any, spec: dict[str, Any], past: int, new: int, seed: int = 0) -> dict:
    """Seeded inputs of one graph call: ``new`` tokens after ``past`` cached ones (zeros
    for the past when ``past_kv`` is not given: filled from a first call by the caller)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = int(spec["vocab_size"])
    ids = rng.integers(4, vocab, size=(2, new), dtype=np.int64)
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((2, past + new), np.int64),
        "position_ids": np.tile(np.arange(past, past + new, dtype=np.int64), (2, 1)),
    }
    for i in range(int(spec["layers"])):
        heads = spec["kv_heads"][i]
        feed[f"past_key_values.{i}.key"] = np.zeros((2, heads, past, spec["key_dims"][i]),
                                                    np.float32)  # fmt: skip
        feed[f"past_key_values.{i}.value"] = np.zeros((2, heads, past, spec["value_dims"][i]),
                                                      np.float32)  # fmt: skip
    types = {i.name: i.type for i in session.get_inputs()}
    half = {"tensor(float16)": np.float16}
    return {k: v.astype(half.get(types[k], v.dtype)) for k, v in feed.items() if k in types}


def _two_calls(session: Any, spec: dict[str, Any]) -> list[tuple[dict, Any]]:
    """A 16-token prefill, then 8 tokens after it with its keys and values as the past:
    ``[(feed, logits)]`` of both calls on ``session``."""
    first = _feeds(session, spec, 0, 16)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, first), strict=True))
    second = _feeds(session, spec, 16, 8, seed=1)
    for i in range(int(spec["layers"])):
        second[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
        second[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
    logits2 = session.run(["logits"], second)[0]
    return [(first, out["logits"]), (second, logits2)]


def _session(graph: Path, provider: str, profile: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile is not None:  # which provider ran each node
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(graph), options, providers=[provider])


def _nodes_by_provider(session: Any) -> dict[str, int]:
    """Nodes per execution provider in the session's profile (ended here)."""
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, set[str]] = {}
    for event in events:
        provider = (event.get("args") or {}).get("provider")
        if event.get("cat") == "Node" and provider:
            nodes.setdefault(provider, set()).add(event.get("name", "").split("_kernel_time")[0])
    return {k: len(v) for k, v in sorted(nodes.items())}


def _bundle(folder: Path) -> tuple[Path, dict[str, Any]]:
    record = json.loads((folder / "knowpress_export.json").read_text())
    return folder / record["files"]["graph"], record


def ort_parity(folder: Path) -> dict[str, Any]:
    """The bundle's graph on CUDAExecutionProvider and CPUExecutionProvider, same feeds."""
    import numpy as np
    import onnxruntime as ort

    graph, record = _bundle(folder)
    spec = record["graph"]
    cuda = _session(graph, "CUDAExecutionProvider", folder.parent / f"ort-profile-{folder.name}")
    used = cuda.get_providers()
    result: dict[str, Any] = {
        "bundle": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
        "weights": record.get("weights"),
        "session_providers": used,
    }
    if not used or used[0] != "CUDAExecutionProvider":
        result["error"] = (
            f"onnxruntime {ort.__version__} fell back to {used} (available: "
            f"{ort.get_available_providers()})"
        )
        return result
    cpu = _session(graph, "CPUExecutionProvider")
    on_cpu = _two_calls(cpu, spec)
    start = time.perf_counter()
    on_cuda = _two_calls(cuda, spec)
    result["cuda_seconds_two_calls_profiled"] = round(time.perf_counter() - start, 4)
    result["nodes_by_provider"] = _nodes_by_provider(cuda)
    diffs, scale = [], 0.0
    for (_, a), (_, b) in zip(on_cpu, on_cuda, strict=True):
        diffs.append(float(np.abs(a - b).max()))
        scale = max(scale, float(np.abs(a).max()))
    result |= {
        "max_abs_logits_diff": max(diffs),
        "max_rel_logits_diff": max(diffs) / scale if scale else None,
        "prefill_and_decode_diffs": diffs,
        "greedy_equal": all(
            bool((a.argmax(-1) == b.argmax(-1)).all())
            for (_, a), (_, b) in zip(on_cpu, on_cuda, strict=True)
        ),
    }
    # float32: the CUDA provider may run matmuls in TF32; int4/int8: kernels round differently
    limit = 1e-2 if record.get("weights") == "float32" else 5e-2
    result["max_rel_limit"] = limit
    if not result["nodes_by_provider"].get("CUDAExecutionProvider"):
        result["error"] = f"no node ran on CUDAExecutionProvider: {result['nodes_by_provider']}"
    elif result["max_rel_logits_diff"] is None or result["max_rel_logits_diff"] > limit:
        result["error"] = f"max rel |Δlogits| {result['max_rel_logits_diff']} over {limit}"
    return result


def cmd_ort(args: argparse.Namespace) -> int:
    import onnxruntime as ort
    import torch  # loads the CUDA libraries onnxruntime-gpu may reuse

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # reported below through the providers used
            print(f"onnxruntime.preload_dlls: {exc}", file=sys.stderr)
    out: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "torch_cuda": torch.version.cuda,
        "bundles": [],
    }
    for folder in args.bundle:
        try:
            out["bundles"].append(ort_parity(Path(folder)))
        except Exception as exc:
            out["bundles"].append({"bundle": folder, "error": f"{type(exc).__name__}: {exc}"})
    Path(args.json).write_text(json.dumps(out, indent=1))
    ok = out["bundles"] and all("error" not in b for b in out["bundles"])
    return 0 if ok else 1


TRT_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
             "INT32": "int32", "BOOL": "bool", "INT8": "int8"}  # fmt: skip


def cmd_trt(args: argparse.Namespace) -> int:
    """An engine from the float32 graph (``formats/onnx/tensorrt.build_engine``), run on the
    feeds of ``_two_calls``; its logits against onnxruntime's on the same feeds."""
    import numpy as np
    import tensorrt as trt
    import torch

    from knowpress.formats.onnx.tensorrt import ENGINE_FILE, build_engine
    from knowpress.pipeline.stages.export import TensorRTSpec

    folder = Path(args.bundle)
    graph, record = _bundle(folder)
    spec = record["graph"]
    options = TensorRTSpec(precision=args.precision)
    start = time.perf_counter()
    build_engine(graph, folder, options, spec)
    build_s = time.perf_counter() - start
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((folder / ENGINE_FILE).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    reference_provider = "CUDAExecutionProvider"
    session = _session(graph, reference_provider)
    if session.get_providers()[0] != reference_provider:
        reference_provider = "CPUExecutionProvider"
        session = _session(graph, reference_provider)
    diffs, scale, greedy = [], 0.0, True
    stream = torch.cuda.current_stream()
    for feed, ort_logits in _two_calls(session, spec):
        held = {}
        for name in inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
            if tensor.numel() == 0:  # a zero-sized past: any valid address
                tensor = torch.empty(1, dtype=tensor.dtype, device="cuda")
            context.set_input_shape(name, tuple(feed[name].shape))
            context.set_tensor_address(name, tensor.data_ptr())
            held[name] = tensor
        for name in names:
            if name in inputs:
                continue
            dtype = getattr(torch, TRT_TORCH[engine.get_tensor_dtype(name).name])
            shape = tuple(context.get_tensor_shape(name))
            tensor = torch.empty(max(1, int(np.prod(shape))), dtype=dtype, device="cuda")
            context.set_tensor_address(name, tensor.data_ptr())
            held[name] = (tensor, shape)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("tensorrt: execute_async_v3 returned False")
        stream.synchronize()
        buffer, shape = held["logits"]
        logits = buffer[: int(np.prod(shape))].view(shape).float().cpu().numpy()
        diffs.append(float(np.abs(logits - ort_logits).max()))
        scale = max(scale, float(np.abs(ort_logits).max()))
        greedy &= bool((logits.argmax(-1) == ort_logits.argmax(-1)).all())
    out = {
        "tensorrt": trt.__version__,
        "precision": args.precision,
        "engine_build_seconds": round(build_s, 2),
        "engine_bytes": (folder / ENGINE_FILE).stat().st_size,
        "reference": f"onnxruntime {reference_provider}",
        "max_abs_logits_diff": max(diffs),
        "max_rel_logits_diff": max(diffs) / scale if scale else None,
        "prefill_and_decode_diffs": diffs,
        "greedy_equal": greedy,
        "torch_peak_gpu_bytes": int(torch.cuda.max_memory_allocated()),
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


# ---------------------------------------------------------------- the run


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.python = sys.executable
        self.start = now()
        self.deadline = float(args.deadline) if args.deadline else self.start + 470
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.wheels = Path(args.wheels).resolve()
        self.cache = Path(os.environ.get("KNOWPRESS_CACHE", ROOT / ".gpu-cache")).resolve()
        self.steps: dict[str, dict[str, Any]] = {}
        self.done: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.local = threading.local()
        cores = os.cpu_count() or 4
        self.env = dict(os.environ)
        self.env.update(
            KNOWPRESS_CACHE=str(self.cache),
            PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS=str(max(1, cores // 6)),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )

    # -- bookkeeping

    def left(self) -> float:
        return self.deadline - now()

    def record(self, name: str, **fields: Any) -> dict[str, Any]:
        with self.lock:
            entry = self.steps.setdefault(name, {"name": name})
            entry.update(fields)
            return entry

    def wait(self, *deps: str) -> str | None:
        """Wait for ``deps``; the reason to skip when one did not succeed."""
        for dep in deps:
            self.done[dep].wait()
            entry = self.steps.get(dep, {})
            status = entry.get("status")
            if status not in ("ok", "gate_failed") and entry.get("reason") != NOT_SELECTED:
                return f"skipped: {dep} {status}"
        return None

    def launch(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        """A child step within the deadline; its record (status ok / failed / timeout)."""
        budget = min(timeout, self.left() - RESERVE_S)
        if budget < 5:
            return self.record(name, status="skipped", reason="no time left in the budget",
                               timeout_s=0)  # fmt: skip
        started = round(now() - self.start, 1)
        safe = name.replace("/", "_")
        result = run_process(argv, budget, self.work / "logs" / f"{safe}.log", self.env)
        status = "ok" if result["exit_code"] == 0 else "failed"
        reason = None if status == "ok" else _last_line(result.get("log_tail", ""))
        if result["timed_out"]:
            status, reason = "timeout", f"ran past its {budget:.0f} s and was killed"
        return self.record(
            name, status=status, reason=reason, started_at_s=started, timeout_s=round(budget, 1),
            command=" ".join(_short(a) for a in argv), **result,
        )  # fmt: skip

    def peak_file(self, name: str) -> Path:
        return self.work / "peaks" / (name.replace("/", "_") + ".json")

    def cli(self, name: str, compress_args: list[str], timeout: float) -> dict[str, Any]:
        peak = self.peak_file(name)
        peak.parent.mkdir(parents=True, exist_ok=True)
        argv = [self.python, str(HELPER), "cli", "--peak", str(peak), "--", *compress_args]
        entry = self.launch(name, argv, timeout)
        entry |= _read_json(peak) or {"torch_peak_gpu_bytes": None}
        return entry

    def step(self, name: str, fn: Any, *deps: str) -> threading.Thread:
        self.done[name] = threading.Event()

        def body() -> None:
            try:
                reason = self.wait(*deps)
                if reason:
                    self.record(name, status="skipped", reason=reason)
                else:
                    fn(name)
            except Exception as exc:  # a step's own bug is its failure, not the run's
                self.record(name, status="failed", reason=f"{type(exc).__name__}: {exc}")
            finally:
                self.done[name].set()

        return threading.Thread(target=body, name=name, daemon=True)

    # -- install

    def pip(self, *args: str, timeout: float = 60) -> tuple[bool, str]:
        until = getattr(self.local, "until", float("inf"))  # the calling step's own limit
        budget = min(timeout, self.left() - 60, until - now())
        if budget < 5:
            return False, "no time left in the budget"
        argv = [self.python, "-m", "pip", "--disable-pip-version-check", *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=budget,
                                  env=self.env)  # fmt: skip
        except subprocess.TimeoutExpired:
            return False, f"pip {args[0]} timed out after {budget:.0f} s"
        text = (done.stdout + done.stderr).strip()
        return done.returncode == 0, tail(text, 600)

    def sources(self) -> list[tuple[str, list[str]]]:
        """Where pip looks: the carried wheels alone first, then the index (with them)."""
        found = self.wheels.is_dir() and any(self.wheels.glob("*.whl"))
        links = ["--find-links", str(self.wheels)] if found else []
        out = [("wheels " + str(self.wheels), ["--no-index", *links])] if found else []
        return [*out, ("package index", [*links, "--timeout", "15", "--retries", "1"])]

    def pip_install(self, reqs: list[str], timeout: float, extra: tuple[str, ...] = ()
                    ) -> dict[str, Any]:  # fmt: skip
        tries = []
        for where, flags in self.sources():
            ok, text = self.pip("install", "-q", *flags, *extra, *reqs, timeout=timeout)
            tries.append({"from": where, "ok": ok, "output": text})
            if ok:
                return {"installed": reqs, "from": where, "tries": tries}
        return {"failed": reqs, "tries": tries, "reason": _last_line(tries[-1]["output"])}

    def probe(self, code: str, timeout: float = 120) -> Any:
        """The JSON a short Python snippet prints last, or ``{"error": why}``."""
        try:
            done = subprocess.run([self.python, "-c", code], capture_output=True, text=True,
                                  timeout=timeout, env=self.env)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"error": str(exc)}
        if done.returncode:
            return {"error": _last_line(done.stderr) or f"exit {done.returncode}"}
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {"error": f"no JSON in {tail(done.stdout, 200)!r}"}

    def missing(self) -> list[str]:
        code = (
            "import importlib.util, importlib.metadata as m, json\n"
            f"mods = {list(REQUIREMENTS)!r}\n"
            "miss = [x for x in mods if importlib.util.find_spec(x) is None]\n"
            "v = m.version('transformers') if 'transformers' not in miss else '5.0'\n"
            "major, minor = (int(p) for p in v.split('.')[:2])\n"
            "if (major, minor) < (5, 0) or (major, minor) >= (5, 24): miss.append('transformers')\n"
            "print(json.dumps(miss))"
        )
        found = self.probe(code)
        return found if isinstance(found, list) else list(REQUIREMENTS)

    def ort_state(self) -> dict[str, Any]:
        return self.probe(
            "import json, sys, importlib.metadata as m\n"
            "import onnxruntime as o\n"
            "dists = [d for d in ('onnxruntime', 'onnxruntime-gpu') if "
            "any(x.metadata['Name'] == d for x in m.distributions())]\n"
            "own = {d: str(m.distribution(d).locate_file('')).startswith(sys.prefix) "
            "for d in dists}\n"
            "print(json.dumps({'version': o.__version__, 'providers': "
            "o.get_available_providers(), 'distributions': dists, 'in_this_env': own}))"
        )

    def install(self, name: str) -> None:
        start = now()
        self.local.until = start + INSTALL_S
        figures: dict[str, Any] = {}
        missing = self.missing()
        figures["missing_before"] = missing
        if missing:
            figures["core"] = self.pip_install([REQUIREMENTS[m] for m in missing], 120)
        figures["missing_after"] = self.missing() if missing else []
        before = self.ort_state()
        figures["onnxruntime_before"] = before
        if "CUDAExecutionProvider" in (before.get("providers") or []):
            figures["onnxruntime_gpu"] = "already present"
        elif self.args.device != "cuda":
            figures["onnxruntime_gpu"] = f"not tried (--device {self.args.device})"
        else:
            figures["onnxruntime_gpu"] = self.swap_ort(before)
        figures["onnxruntime_after"] = self.ort_state()
        critical = [m for m in figures["missing_after"] if m in CRITICAL]
        ok = not critical
        self.record(
            name, status="ok" if ok else "failed", wall_s=round(now() - start, 2),
            timeout_s=INSTALL_S, started_at_s=round(start - self.start, 1),
            exit_code=0 if ok else 1, figures=figures,
            reason=None if ok else f"still missing: {critical}",
        )  # fmt: skip

    def swap_ort(self, before: dict[str, Any]) -> dict[str, Any]:
        """Download onnxruntime-gpu first; only then take onnxruntime out of this
        environment (the two share a module) and install the download."""
        target = self.work / "onnxruntime-gpu"
        got: dict[str, Any] = {"tries": []}
        for where, flags in self.sources():
            ok, text = self.pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                                str(target), *flags, "onnxruntime-gpu", timeout=150)  # fmt: skip
            got["tries"].append({"from": where, "ok": ok, "output": text})
            if ok:
                break
        wheels = sorted(target.glob("onnxruntime_gpu-*.whl"))
        if not wheels:
            return got | {"result": "onnxruntime-gpu not installable: "
                          + _last_line(got["tries"][-1]["output"])}  # fmt: skip
        if (before.get("in_this_env") or {}).get("onnxruntime"):
            ok, text = self.pip("uninstall", "-y", "onnxruntime", timeout=60)
            got["uninstall_onnxruntime"] = {"ok": ok, "output": text}
        done = self.pip_install([str(wheels[-1])], 120)
        got["install"] = done
        if "failed" in done and (before.get("in_this_env") or {}).get("onnxruntime"):
            got["restore_onnxruntime"] = self.pip_install(["onnxruntime"], 60)
        return got | {"result": "installed " + wheels[-1].name if "installed" in done
                      else "onnxruntime-gpu not installable: " + done["reason"]}  # fmt: skip

    def install_tensorrt(self, name: str) -> None:
        start = now()
        self.local.until = start + TENSORRT_INSTALL_S
        cuda = self.probe("import json, torch; print(json.dumps(torch.version.cuda))")
        major = str(cuda).split(".")[0] if isinstance(cuda, str) else "12"
        present = self.probe("import json, tensorrt; print(json.dumps(tensorrt.__version__))")
        if self.args.device != "cuda" and not isinstance(present, str):
            self.record(name, status="skipped", reason=f"not tried (--device {self.args.device})")
            return
        if isinstance(present, str):
            figures: dict[str, Any] = {"tensorrt": present, "result": "already present"}
        else:
            package = f"tensorrt-cu{major}"
            figures = self.pip_install(
                [package], 200, ("--extra-index-url", "https://pypi.nvidia.com")
            )
            figures["package"] = package
            version = self.probe("import json, tensorrt; print(json.dumps(tensorrt.__version__))")
            if isinstance(version, str):
                figures["tensorrt"] = version
        ok = "tensorrt" in figures
        reason = None
        if not ok:
            why = figures.get("reason") or "import failed after install"
            reason = f"tensorrt not installable: {why}"
        self.record(
            name, status="ok" if ok else "failed", wall_s=round(now() - start, 2),
            timeout_s=TENSORRT_INSTALL_S, started_at_s=round(start - self.start, 1),
            exit_code=0 if ok else 1, figures=figures, reason=reason,
        )  # fmt: skip

    # -- steps

    def teacher(self, preset: str) -> Any:
        def run(name: str) -> None:
            folder = self.teacher_folder(preset)
            cached = folder is not None and (folder / "knowpress_world.json").is_file()
            args = ["world", "build", "--preset", preset, "--device", self.args.device, "-q"]
            entry = self.cli(name, args, 170)
            folder = self.teacher_folder(preset)
            info = _read_json(folder / "knowpress_world.json") if folder else None
            entry["figures"] = {
                "loaded_from_cache": cached,
                "folder": str(folder) if folder else None,
                "train": (info or {}).get("train"),
            }

        return run

    def teacher_folder(self, preset: str) -> Path | None:
        found = self.probe(
            "import json; from knowpress.worlds.store import teacher_dir; "
            f"print(json.dumps(str(teacher_dir({preset!r}))))",
            timeout=60,
        )
        return Path(found) if isinstance(found, str) else None

    def recipe(self, recipe: str | None) -> Any:
        def run(name: str) -> None:
            path = Path(recipe) if recipe else self.work / "kv-snapkv.yaml"
            if recipe is None:
                path.write_text(KV_RECIPE)
            out = self.work / "runs" / name.split("/", 1)[1]
            args = [
                "apply",
                str(path),
                "-o",
                str(out),
                "--device",
                self.args.device,
                "--force",
                "-q",
            ]
            timeout = RECIPES[name.split("/", 1)[1]][2]
            entry = self.cli(name, args, timeout)
            entry["figures"] = report_figures(out / "report.json")
            if entry.get("exit_code") == 1 and (entry["figures"] or {}).get("gate"):
                entry["status"] = "gate_failed"  # exit 1 is only ever a failed gate
            if recipe is None:
                entry["recipe"] = KV_RECIPE

        return run

    def export(self, name: str) -> None:
        folder = self.teacher_folder(DENSE)
        args = ["export", str(folder), "-o", str(self.work / "export-float32"),
                "--weights", "float32", "--force", "-q"]  # fmt: skip
        entry = self.cli(name, args, 120)
        record = _read_json(self.work / "export-float32" / "knowpress_export.json")
        if record:
            entry["figures"] = {"parity_vs_pytorch": record.get("parity"),
                                "weights": record.get("weights")}  # fmt: skip

    def ort(self, name: str) -> None:
        bundles = [str(self.work / "export-float32")]
        self.done["apply/edge"].wait(timeout=max(0.0, min(60.0, self.left() - 90)))
        edge = sorted((self.work / "runs" / "edge" / "stages").glob("*-export"))
        if edge and (edge[-1] / "knowpress_export.json").is_file():
            bundles.append(str(edge[-1]))
        out = self.work / "onnxruntime.json"
        argv = [self.python, str(HELPER), "ort", "--json", str(out)]
        for bundle in bundles:
            argv += ["--bundle", bundle]
        entry = self.launch(name, argv, 90)
        entry["figures"] = _read_json(out)
        errors = [b["error"] for b in (entry["figures"] or {}).get("bundles", []) if "error" in b]
        if errors and entry["status"] != "timeout":
            entry["reason"] = "; ".join(errors)

    def tensorrt(self, name: str) -> None:
        self.done["install/tensorrt"].wait()
        install = self.steps.get("install/tensorrt", {})
        if install.get("status") != "ok" and install.get("reason") != NOT_SELECTED:
            self.record(name, status="skipped",
                        reason=install.get("reason") or "tensorrt not installable")  # fmt: skip
            return
        reason = self.wait("export/float32")
        if reason:
            self.record(name, status="skipped", reason=reason)
            return
        out = self.work / "tensorrt.json"
        argv = [self.python, str(HELPER), "trt", "--bundle", str(self.work / "export-float32"),
                "--json", str(out)]  # fmt: skip
        entry = self.launch(name, argv, 180)
        entry["figures"] = _read_json(out)

    def scale(self, name: str) -> None:
        script = ROOT / "benchmarks" / "scale.py"
        if not script.is_file():
            self.record(name, status="failed", reason="benchmarks/scale.py is not in this tree")
            return
        out = self.work / "scale.json"
        peak = self.peak_file(name)
        peak.parent.mkdir(parents=True, exist_ok=True)
        device = self.args.device
        argv = [self.python, str(HELPER), "pyrun", "--peak", str(peak), "--", str(script),
                "--sizes", "llama-1b", "--device", device, "--json", str(out)]  # fmt: skip
        entry = self.launch(name, argv, 380)
        entry |= _read_json(peak) or {"torch_peak_gpu_bytes": None}
        result = _read_json(out)
        text = json.dumps(result) if result is not None else ""
        entry["figures"] = result if len(text) < 60_000 else {"truncated": text[:60_000]}

    # -- the whole

    def go(self) -> dict[str, Any]:
        only = set(self.args.only.split(",")) if self.args.only else None
        threads = []
        plan: list[tuple[str, Any, tuple[str, ...]]] = [
            ("install", self.install, ()),
            ("install/tensorrt", self.install_tensorrt, ("install",)),
            (f"teacher/{DENSE}", self.teacher(DENSE), ("install",)),
            (f"teacher/{MOE}", self.teacher(MOE), ("install",)),
            ("scale/llama-1b", self.scale, ("install",)),
        ]
        for recipe, (path, preset, _) in RECIPES.items():
            plan.append((f"apply/{recipe}", self.recipe(path), (f"teacher/{preset}",)))
        plan += [
            ("export/float32", self.export, (f"teacher/{DENSE}",)),
            ("onnxruntime", self.ort, ("export/float32",)),
            ("tensorrt", self.tensorrt, ()),  # waits for install/tensorrt, export/float32
        ]
        for name, fn, deps in plan:
            if only is not None and name not in only:
                self.done[name] = threading.Event()
                self.record(name, status="skipped", reason=NOT_SELECTED)
                self.done[name].set()
                continue
            threads.append(self.step(name, fn, *deps))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, self.left() + 60))
        return self.summary([n for n, _, _ in plan])

    def summary(self, order: list[str]) -> dict[str, Any]:
        steps = [self.steps.get(n, {"name": n, "status": "unfinished"}) for n in order]
        return {
            "schema": SCHEMA,
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "bash benchmarks/gpu_smoke.sh",
            "budget_s": round(self.deadline - float(self.args.started or self.start), 1),
            "wall_s": round(now() - float(self.args.started or self.start), 1),
            "nvidia_smi": _nvidia_smi(),
            "environment": self.environment(),
            "teachers": CHOICE,
            "cache": str(self.cache),
            "steps": steps,
            "ok": [s["name"] for s in steps if s.get("status") == "ok"],
            "not_ok": {s["name"]: s.get("status") for s in steps if s.get("status") != "ok"},
        }

    def environment(self) -> dict[str, Any]:
        found = self.probe(
            "import json, sys, importlib.metadata as m\n"
            "out = {'python': sys.executable, 'python_version': sys.version.split()[0]}\n"
            "for d in ('torch', 'transformers', 'onnxruntime', 'onnxruntime-gpu', 'onnx', "
            "'tensorrt', 'tensorrt-cu12', 'tensorrt-cu13', 'compressed-tensors', 'accelerate'):\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: pass\n"
            "import torch\n"
            "out['torch_cuda'] = torch.version.cuda\n"
            "out['cuda_device'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() "
            "else None\n"
            "print(json.dumps(out))",
            timeout=60,
        )
        return {**(found if isinstance(found, dict) else {}),
                "setup": os.environ.get("GPU_SMOKE_SETUP")}  # fmt: skip


def report_figures(path: Path) -> dict[str, Any] | None:
    """The final row of a report.json: its stage, stored bytes, retention, kl."""
    report = _read_json(path)
    if not report or not report.get("rows"):
        return None
    row = report["rows"][-1]
    scores = row.get("scores") or {}
    stages = [
        {"kind": s.get("kind"), "seconds": s.get("seconds")}
        for s in report.get("stages") or []
        if isinstance(s, dict)
    ]
    return {
        "final_row": row.get("name"),
        "stored_bytes": row.get("stored_bytes"),
        "size_vs_bf16_reference": row.get("size_vs_bf16_reference"),
        "retention": row.get("retention"),
        "worst_retention": row.get("worst_retention"),
        "kl": scores.get("kl"),
        "scores": scores,
        "runtime": row.get("runtime"),
        "kv_bytes_per_token": row.get("kv_bytes_per_token"),
        "execution": report.get("execution"),
        "stage_seconds": stages,
        "gate": report.get("gate"),
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _last_line(text: str) -> str:
    lines = [x for x in (text or "").strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def _short(arg: str) -> str:
    try:
        return str(Path(arg).relative_to(ROOT)) if arg.startswith(str(ROOT)) else arg
    except ValueError:
        return arg


def _nvidia_smi() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi: {exc}"


def cmd_run(args: argparse.Namespace) -> int:
    run = Run(args)
    result = run.go()
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    for step in result["steps"]:
        why = step.get("reason") or ""
        print(f"{step['name']:<24} {step.get('status', '?'):<12} "
              f"{step.get('wall_s', '-')!s:>8} s  {why[:110]}")  # fmt: skip
    print(f"gpu_smoke: {len(result['ok'])}/{len(result['steps'])} steps ok; "
          f"{result['wall_s']} s; wrote {out}")  # fmt: skip
    return 0 if not result["not_ok"] else 1


#: what the device machines' image lacks of knowpress's needs (their package list in the
#: device tool's KINDS.md): carried as wheels, since nothing can be fetched there
CARRIED_WHEELS = (
    "pydantic>=2.7,<3", "pydantic-core", "annotated-types", "typing-inspection",
    "typing-extensions", "platformdirs>=4", "compressed-tensors>=0.20,<0.21", "loguru",
    "gguf>=0.19,<0.20",
)  # fmt: skip


def cmd_wheels(args: argparse.Namespace) -> int:
    """Here, before a device run: the wheels ``CARRIED_WHEELS`` for the machine's Python
    (x86-64 manylinux) into ``--dest`` (``.whl``, carried with ``carry: [".whl"]``)."""
    platforms = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", args.python_version, "--implementation", "cp", "-d",
            args.dest]  # fmt: skip
    for platform in platforms:
        argv += ["--platform", platform]
    done = subprocess.run([*argv, *CARRIED_WHEELS], cwd=ROOT)
    total = sum(f.stat().st_size for f in Path(ROOT / args.dest).glob("*.whl"))
    print(f"{args.dest}: {total / 2**20:.1f} MiB of wheels (the device carries 64 MiB at most)")
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="every step, one JSON")
    p.add_argument("--out", default="benchmarks/results/gpu_smoke.json")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds")
    p.add_argument("--started", type=float, default=None, help="epoch seconds")
    p.add_argument("--work", default=str(ROOT / ".gpu-smoke"))
    p.add_argument("--wheels", default=str(ROOT / ".whl"))
    p.add_argument("--only", default=None, help="comma-separated step names")
    p.add_argument("--device", default="cuda", help="cpu tries the steps without a GPU")
    p.set_defaults(func=cmd_run)
    for name, func in (("cli", cmd_cli), ("pyrun", cmd_pyrun)):
        p = sub.add_parser(name)
        p.add_argument("--peak", required=True)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    p = sub.add_parser("wheels", help="download the wheels a device run carries")
    p.add_argument("--dest", default=".whl")
    p.add_argument("--python-version", default="3.12")
    p.set_defaults(func=cmd_wheels)
    p = sub.add_parser("ort")
    p.add_argument("--bundle", action="append", required=True)
    p.add_argument("--json", required=True)
    p.set_defaults(func=cmd_ort)
    p = sub.add_parser("trt")
    p.add_argument("--bundle", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--precision", default="fp16", choices=("fp16", "bf16"))
    p.set_defaults(func=cmd_trt)
    args = parser.parse_args(argv)
    if getattr(args, "rest", None) and args.rest[0] == "--":
        args.rest = args.rest[1:]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
