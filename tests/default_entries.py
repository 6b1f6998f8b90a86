"""One row per registered entry of every family: the configs the family matrices run.

Adding a method = its file + one import + one row here (kvpress's tests/default_presses.py);
``test_registries.py`` fails when a registered name has no row or a row names nothing
registered. World presets need no row: their matrix parametrizes over ``PRESETS`` itself
(tests/worlds/test_world_presets.py).
"""

from __future__ import annotations

from typing import Any

import knowpress.pipeline.stages
import knowpress.testing.stages  # noqa: F401  (registers the test-only stage kind)

#: stage kind -> a stage block that runs on the ``test-tiny`` teacher
STAGES: dict[str, dict[str, Any]] = {
    "quantize": {"kind": "quantize", "method": {"name": "rtn", "bits": 4, "group_size": 32}},
    "attach_test_policy": {"kind": "attach_test_policy", "payload_bytes": 1000},
    "distill": {
        "kind": "distill",
        "student": {"make": "depth", "keep": 0.5},
        "train": {"steps": 4, "batch_size": 8},
    },
    "prune_experts": {
        "kind": "prune_experts",
        "method": {"name": "reap"},
        "sparsity": 0.25,
        "precheck": {"probe_samples": 4},
    },
    "recalibrate_routers": {"kind": "recalibrate_routers"},
    "compress_kv": {"kind": "compress_kv", "policy": {"name": "streaming", "budget": 16}},
    "skip_experts": {"kind": "skip_experts", "policy": {"name": "odp", "beta": 0.5}},
    "export": {"kind": "export", "weights": "int4", "accuracy_level": 4},
    "qad": {"kind": "qad", "train": {"steps": 4, "batch_size": 8, "checkpoint_every": 2}},
}
#: stage kind -> the stages that make its input (qad trains what a quantize stage packed)
STAGE_INPUTS: dict[str, list[dict[str, Any]]] = {
    "qad": [{"kind": "quantize", "method": {"name": "rtn", "bits": 2, "group_size": 32}}],
}
#: stage kind -> the preset it runs on when not ``test-tiny`` (MoE stages need an MoE teacher)
STAGE_MODELS: dict[str, str] = {
    "prune_experts": "test-moe-tiny",
    "recalibrate_routers": "test-moe-tiny",
    "skip_experts": "test-moe-tiny",
}

#: expert-pruning method -> its config (the prune_experts matrix in tests/compress/moe)
EXPERT_PRUNERS: dict[str, dict[str, Any]] = {
    "reap": {"name": "reap"},
    "frequency": {"name": "frequency"},
    "routing_weight": {"name": "routing_weight"},
    "merge": {"name": "merge"},
}

#: quant method -> [(method block, minimum weight SQNR in dB on a random tiny Llama); methods
#: that use calibration data get the matrix's text file]
QUANT_METHODS: dict[str, list[tuple[dict[str, Any], float]]] = {
    "rtn": [
        ({"name": "rtn", "bits": 8, "group_size": 32}, 44.0),
        ({"name": "rtn", "bits": 4, "group_size": 32}, 20.0),
        ({"name": "rtn", "bits": 4, "group_size": None}, 18.0),
        ({"name": "rtn", "bits": 4, "group_size": 32, "symmetric": False}, 21.3),
        ({"name": "rtn", "bits": 3, "group_size": 32}, 13.5),
        ({"name": "rtn", "bits": 2, "group_size": 32}, 6.0),
        ({"name": "rtn", "bits": 2, "group_size": 32, "symmetric": False}, 7.3),
        # float grids (tensors/grids.py), measured 31.6 / 31.4 / 20.4 / 18.6 dB at the worst layer
        ({"name": "rtn", "dtype": "fp8"}, 30.5),
        ({"name": "rtn", "dtype": "fp8", "group_size": 64}, 30.5),
        ({"name": "rtn", "dtype": "nvfp4"}, 19.5),
        ({"name": "rtn", "dtype": "mxfp4"}, 17.5),
    ],
    "gptq": [
        ({"name": "gptq", "bits": 8, "group_size": 32}, 40.0),
        ({"name": "gptq", "bits": 4, "group_size": 32}, 16.0),
        ({"name": "gptq", "bits": 4, "group_size": 64, "act_order": False}, 14.0),
        ({"name": "gptq", "bits": 4, "group_size": 32, "symmetric": False}, 17.0),
        ({"name": "gptq", "bits": 3, "group_size": 32}, 9.0),
        ({"name": "gptq", "bits": 2, "group_size": 32}, 2.2),
        # weight SQNR (GPTQ trades it for output error): measured 27.4 / 27.0 / 16.3 / 14.3 dB
        ({"name": "gptq", "dtype": "fp8"}, 26.5),
        ({"name": "gptq", "dtype": "fp8", "group_size": 64}, 26.0),
        ({"name": "gptq", "dtype": "nvfp4"}, 15.5),
        ({"name": "gptq", "dtype": "mxfp4"}, 13.5),
    ],
}

#: bit plan -> (bits_plan block, the tiny model it plans: "dense" tiny_llama | "moe" tiny_mixtral)
BIT_PLANS: dict[str, tuple[dict[str, Any], str]] = {
    "moe_lp": ({"name": "moe_lp", "avg_bits": 3.0}, "moe"),
    "sensitivity": ({"name": "sensitivity", "avg_bits": 3.0}, "dense"),
}

#: eval task -> its options (none yet); every task runs on a protocol-only runtime
TASKS: dict[str, dict[str, Any]] = {
    "recall": {},
    "paraphrase": {},
    "two_hop": {},
    "long_context": {},
    "bits": {},
    "perplexity": {},
    "kl": {},
}

#: KV policy -> (policy block, exact: same logits and tokens as the full cache)
KV_POLICIES: dict[str, tuple[dict[str, Any], bool]] = {
    "full": ({"name": "full"}, True),
    "streaming": ({"name": "streaming", "sinks": 1, "budget": 4}, False),
    "kivi": ({"name": "kivi", "bits": 2, "group_size": 4, "residual": 2}, False),
    "gear": (
        {"name": "gear", "bits": 2, "rank": 1, "outliers": 0.05, "group_size": 4, "residual": 2},
        False,
    ),
    "h2o": ({"name": "h2o", "budget": 4, "recent": 0.5}, False),
    "compose": (
        {
            "name": "compose",
            "policies": [
                {"name": "h2o", "budget": 4},
                {"name": "kivi", "bits": 2, "group_size": 4, "residual": 1},
            ],
        },
        False,
    ),
    "snapkv": ({"name": "snapkv", "budget": 4, "window": 2, "kernel": 3}, False),
    "rkv": ({"name": "rkv", "budget": 4, "buffer": 2, "window": 2, "kernel": 3}, False),
    "head_budget": (
        {
            "name": "head_budget",
            "budget": 4,
            "probes": 2,
            "probe_length": 16,
            "policy": {"name": "snapkv", "window": 2, "kernel": 3},
        },
        False,
    ),
}

#: artifact format -> how a test folder of that format is written ("plain" | "packed" |
#: "compressed-tensors" | "onnx": the export stage's bundle | "gguf": its llama.cpp file)
FORMATS: dict[str, str] = {
    "hf": "plain",
    "hf-packed": "packed",
    "hf-compressed-tensors": "compressed-tensors",
    "onnx": "onnx",
    "gguf": "gguf",
}

#: distill loss -> its config (the defaults a recipe gets, the matrix in tests/distill)
DISTILL_LOSSES: dict[str, dict[str, Any]] = {
    "forward_kl": {"name": "forward_kl"},
    "reverse_kl": {"name": "reverse_kl"},
    "gjsd": {"name": "gjsd", "beta": 0.5},
    "skew_kl": {"name": "skew_kl", "alpha": 0.1},
    "skew_reverse_kl": {"name": "skew_reverse_kl", "alpha": 0.1},
    "tvd": {"name": "tvd"},
    "akl": {"name": "akl"},
    "ce": {"name": "ce"},
    "taid": {"name": "taid"},
    "delta_kd": {"name": "delta_kd", "teacher_base": {"path": "./base"}},
}
