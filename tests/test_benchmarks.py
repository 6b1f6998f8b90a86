"""benchmarks/knowledge_instrument.py: merging rows across runs, the long_context line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from knowpress.worlds import PRESETS

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _instrument(name: str = "knowledge_instrument") -> ModuleType:
    if str(BENCHMARKS) not in sys.path:  # the scripts import their shared results_io
        sys.path.insert(0, str(BENCHMARKS))
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_keeps_current_rows_of_other_presets_only() -> None:
    merge = _instrument().merge
    dense, moe = PRESETS.get("bios-dense-small").key(), PRESETS.get("bios-moe-small").key()
    previous = [
        {"preset": "bios-moe-small", "teacher": f"/c/teachers/bios-moe-small-{moe}", "v": 0},
        {"preset": "bios-dense-small", "preset_key": "0123456789ab", "teacher": "x", "v": 0},
        {"preset": "bios-dense-tiny", "preset_key": PRESETS.get("bios-dense-tiny").key(), "v": 0},
        {"preset": "removed-preset", "preset_key": "0123456789ab", "v": 0},
    ]
    fresh = [{"preset": "bios-moe-small", "preset_key": moe, "v": 1}]
    merged = merge(previous, fresh)
    # the fresh Mixtral row replaces the old one; the stale dense row and the unknown preset go
    assert [(r["preset"], r["v"]) for r in merged] == [
        ("bios-dense-tiny", 0),
        ("bios-moe-small", 1),
    ]
    fresh.append({"preset": "bios-dense-small", "preset_key": dense, "v": 1})
    assert [r["preset"] for r in merge([], fresh)] == ["bios-dense-small", "bios-moe-small"]


def test_long_context_line_shows_the_trained_lengths_when_known() -> None:
    line = _instrument().long_context_line
    extra = {"em/bios=1": 1.0, "tokens/bios=1": 81.0, "em/bios=2": 0.5, "tokens/bios=2": 143.0}
    assert line(extra) == "1 bios 1.00 (81 tok), 2 bios 0.50 (143 tok)"
    extra |= {"trained_bios": 1.0, "em/trained_lengths": 1.0}
    assert line(extra).endswith("; trained lengths (<= 1 bios) 1.0000")


def test_sensitivity_rounds_linear_layers_and_fused_experts_per_expert() -> None:
    import torch

    from knowpress.tensors.packing import dequantize_groups, quantize_groups
    from knowpress.testing.models import tiny_mixtral

    fake_quantize = _instrument("sensitivity").fake_quantize
    model = tiny_mixtral()
    experts = model.model.layers[0].mlp.experts.down_proj  # [E, H, I]
    before = experts.detach().clone()
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    assert fake_quantize(model, 2, 32) == 4 + 2  # q, k, v, o + gate_up_proj, down_proj
    one = quantize_groups(before[1], 2, 32, symmetric=False)  # expert 1 alone, its own scales
    expected = dequantize_groups(one.codes, one.scales, one.zeros, 2, 32)
    assert torch.equal(experts[1], expected)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)  # the router stays float


def test_a_partial_quantize_rerun_keeps_the_presets_other_rows() -> None:
    keep_rows = _instrument("quantize").keep_rows
    row = {"worst_retention": 1.0}
    previous = [
        {
            "preset": "p",
            "preset_key": "k",
            "rows": [
                {"method": "rtn", "bits": 4, "group": 32, "v": 0, **row},
                {"method": "gptq", "bits": 4, "group": 32, "v": 0, **row},
            ],
        },
        {"preset": "q", "preset_key": "k", "rows": [{"method": "rtn", "bits": 8, "group": 32}]},
    ]
    fresh = [{"preset": "p", "preset_key": "k", "rows": [
        {"method": "gptq", "bits": 4, "group": 32, "v": 1, **row},
        {"method": "gptq-asym", "bits": 4, "group": 32, "v": 1, **row},
    ]}]  # fmt: skip
    keep_rows(previous, fresh)
    got = sorted((r["method"], r["v"]) for r in fresh[0]["rows"])
    assert got == [("gptq", 1), ("gptq-asym", 1), ("rtn", 0)]  # measured rows replace old ones
    stale = [{"preset": "p", "preset_key": "other", "rows": [{"method": "x", "bits": 4,
                                                               "group": 32}]}]  # fmt: skip
    fresh = [{"preset": "p", "preset_key": "k", "rows": []}]
    keep_rows(stale, fresh)
    assert fresh[0]["rows"] == []  # rows of another teacher are not carried over


def test_kv_benchmark_policies_validate_and_bio_prompts_stop_before_a_value() -> None:
    from types import SimpleNamespace

    from knowpress.methods.kv import policy_from_json
    from knowpress.worlds import WorldConfig, generate_world

    kv = _instrument("kv")
    args = SimpleNamespace(
        families=["eviction", "quantized", "compose"],
        budgets=[0.5, 0.125],
        policy=['kivi2r16={"name": "kivi", "bits": 2, "residual": 16}'],
        only=[],
    )
    blocks = kv.configs(args)
    assert blocks[0][0] == "full" and len({(label, b) for label, b, _ in blocks}) == len(blocks)
    for label, budget, block in blocks:
        policy = policy_from_json(block, label)
        if budget is not None:  # the eviction policy (or compose's eviction member) has it
            assert (getattr(policy, "eviction", policy)).budget == budget
    world = generate_world(WorldConfig(n_people=6, seed=3))
    for (prompt, values), person in zip(kv.bio_items(world, 4), world.people, strict=False):
        assert prompt.startswith(person.name) and not any(v in prompt for v in values)
        bio = world.training_bios()[world.people.index(person) * world.config.bios_per_person]
        assert bio.startswith(prompt) and any(bio[len(prompt) :].strip().startswith(v)
                                              for v in values)  # fmt: skip


def _row(tool: str, method: str, stored: int, worst: float) -> dict[str, object]:
    return {"tool": tool, "method": method, "stored_bytes": stored, "worst_retention": worst,
            "size_vs_bf16_teacher": stored / 1000}  # fmt: skip


def test_frontier_pareto_and_equal_bytes_on_a_hand_built_case() -> None:
    frontier = _instrument("frontier")
    rows = [_row("knowpress", "a", 500, 0.60), _row("knowpress", "b", 505, 0.70),
            _row("knowpress", "c", 400, 0.65), _row("knowpress", "d", 530, 0.95),
            _row("llm-compressor", "llmcompressor/w4-g32", 503, 0.49),
            _row("llm-compressor", "llmcompressor/w2-g32", 300, 0.10)]  # fmt: skip
    front = frontier.pareto([r for r in rows if r["tool"] == "knowpress"])
    assert [r["method"] for r in front] == ["c", "b", "d"]  # a: c is smaller and keeps more
    table = frontier.equal_bytes(rows)  # d is 5 % over, outside the 2 % window
    assert [(t["anchor"], t["ours"], round(t["gain"], 3)) for t in table] == [
        ("llmcompressor/w4-g32", "b", 0.21)
    ]
