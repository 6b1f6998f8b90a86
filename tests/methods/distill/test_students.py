"""Students: the promised parameter counts, exact pruning of dead channels and heads, and
checkpoints stock transformers reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from knowpress.core.errors import KnowpressError
from knowpress.formats.sizes import parameter_count
from knowpress.methods.distill.students import (
    StudentSpec,
    block_influence,
    check_student,
    make_student,
    student_config,
)
from knowpress.testing.models import tiny_llama, tiny_mixtral

IDS = [torch.randint(3, 120, (4, 24), generator=torch.Generator().manual_seed(0))]


def _llama_params(c: LlamaConfig, heads: int, kv: int, inter: int, layers: int) -> int:
    """Llama's parameter count from its shapes (tied head; no biases)."""
    h, d, v = c.hidden_size, c.head_dim, c.vocab_size
    attn = h * heads * d * 2 + h * kv * d * 2
    return v * h + h + layers * (attn + 3 * h * inter + 2 * h)


@pytest.mark.parametrize(
    ("spec", "heads", "kv", "inter", "layers"),
    [
        (StudentSpec(make="depth", keep=0.5), 4, 2, 128, 1),
        (StudentSpec(make="width", mlp_keep=0.5, heads_keep=0.5), 2, 2, 64, 2),
        (StudentSpec(make="width", mlp_keep=0.25), 4, 2, 32, 2),
        (StudentSpec(make="config", config={"intermediate_size": 96}), 4, 2, 96, 2),
    ],
    ids=["depth-half", "width-half", "mlp-quarter", "config"],
)
def test_students_have_the_promised_size_and_reload(
    spec: StudentSpec, heads: int, kv: int, inter: int, layers: int, tmp_path: Path
) -> None:
    teacher = tiny_llama()
    student = make_student(spec, teacher, IDS)
    c = student.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.num_hidden_layers) == (heads, kv, inter, layers)  # fmt: skip
    assert parameter_count(student) == _llama_params(c, heads, kv, inter, layers)
    assert parameter_count(teacher) == 82240  # the teacher is not changed
    planned = student_config(spec, teacher.config)  # what --dry-run checks later stages on
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size",
            "num_hidden_layers", "head_dim", "hidden_size")  # fmt: skip
    assert {k: getattr(planned, k) for k in keys} == {k: getattr(c, k) for k in keys}
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS[0]).logits, student(IDS[0]).logits, atol=1e-5)
    out = reloaded.generate(IDS[0][:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 11)


def test_width_pruning_dead_channels_and_heads_is_exact() -> None:
    teacher = tiny_llama()
    teacher.config.num_key_value_heads = 4  # multi-head attention: heads prune with their KV
    for layer in teacher.model.layers:
        attn = layer.self_attn
        d = teacher.config.head_dim
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight.data = torch.randn(4 * d, 64)
        attn.num_key_value_groups = 1
        with torch.no_grad():
            layer.mlp.up_proj.weight[::2] = 0  # every other channel outputs 0
            attn.v_proj.weight[d : 2 * d] = 0  # heads 1 and 3 output 0
            attn.v_proj.weight[3 * d :] = 0
    spec = StudentSpec(make="width", mlp_keep=0.5, heads_keep=0.5)
    student = make_student(spec, teacher, IDS)
    assert student.config.num_attention_heads == 2 and student.config.intermediate_size == 64
    with torch.no_grad():
        assert torch.allclose(student(IDS[0]).logits, teacher(IDS[0]).logits, atol=1e-5)


def test_depth_drops_the_layer_that_changes_its_input_least() -> None:
    teacher = tiny_llama(layers=3)
    with torch.no_grad():  # layer 1 becomes the identity: influence 0
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    influence = block_influence(teacher, IDS)
    assert influence[1] == pytest.approx(0.0, abs=1e-6) and min(influence[0], influence[2]) > 0
    student = make_student(StudentSpec(make="depth", keep=0.67), teacher, IDS)
    assert student.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.allclose(student(IDS[0]).logits, teacher(IDS[0]).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StudentSpec(make="config", config={"hiden_size": 8}), "'hiden_size' is not a field"),
        (StudentSpec(make="config"), "give the fields to change"),
        (StudentSpec(make="depth"), "student.keep"),
    ],
)
def test_bad_student_specs_are_one_line(spec: StudentSpec, message: str) -> None:
    assert message in (check_student(spec, tiny_llama().config) or "")
    with pytest.raises(KnowpressError, match=message):
        make_student(spec, tiny_llama(), IDS)


def test_pruning_a_moe_model_points_to_make_config() -> None:
    problem = check_student(StudentSpec(make="width"), tiny_mixtral().config)
    assert problem is not None and "use make: depth or config" in problem
