"""GGUF files: Q4_K blocks as the gguf package reads them, the round trip per weight type,
carried vs re-quantized codes, the tokenizer metadata, and the reader against transformers'
own GGUF loader."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.formats import detect
from knowpress.methods.quant.rtn import RTN
from knowpress.methods.quant.targets import select
from knowpress.runtimes.loader import load_runtime
from knowpress.runtimes.torch import TorchRuntime
from knowpress.testing.export import gguf_folder
from knowpress.testing.models import tiny_llama, tiny_mixtral, tiny_tokenizer

gguf = pytest.importorskip("gguf")

PROMPTS = ["w1 w2 w3", "w7 w9 w11 w4"]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def test_q4_k_blocks_are_what_the_gguf_package_decodes() -> None:
    """The packing (6-bit scales and mins split over 12 bytes, nibbles per 64-value chunk)
    against gguf.quants.dequantize, on random fields; the quantizer's error bounds."""
    from knowpress.formats.gguf.kquant import pack_q4_k, quantize_q4_k

    rng = np.random.default_rng(0)
    n = 6
    d = rng.uniform(0.001, 0.01, n).astype(np.float16)
    dmin = rng.uniform(0.001, 0.01, n).astype(np.float16)
    scales, mins = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
    codes = rng.integers(0, 16, (n, 8, 32))
    expected = (
        d.astype(np.float32)[:, None, None] * scales[..., None].astype(np.float32) * codes
        - dmin.astype(np.float32)[:, None, None] * mins[..., None].astype(np.float32)
    ).reshape(n, 256)
    decoded = gguf.quants.dequantize(
        pack_q4_k(d, dmin, scales, mins, codes), gguf.GGMLQuantizationType.Q4_K
    )
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-7)

    values = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    values[0, :256] = 0  # an all-zero superblock
    values[1, :256] = np.abs(values[1, :256])  # no negative value: min 0
    blocks = quantize_q4_k(values)
    assert blocks.shape == (8, 2 * 144) and blocks.dtype == np.uint8
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    assert np.all(back[0, :256] == 0)
    error = np.sqrt(((back - values) ** 2).mean() / (values**2).mean())
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_0),
                                  gguf.GGMLQuantizationType.Q4_0)  # fmt: skip
    assert error < np.sqrt(((q4_0 - values) ** 2).mean() / (values**2).mean()) < 0.1
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(values[:, :128])


@pytest.mark.parametrize("weights", ["q8_0", "q4_0", "q4_k"])
def test_each_weight_type_round_trips_and_scores_the_file(weights: str, tmp_path: Path) -> None:
    """hidden 256: every matrix but the MLP's 128-wide down projection holds Q4_K blocks."""
    model = tiny_llama(hidden_size=256, intermediate_size=128)
    original = copy.deepcopy(model)
    metrics = gguf_folder(model, tiny_tokenizer(), tmp_path / weights, weights=weights)
    folder = tmp_path / weights
    assert detect(folder)[0].name == "gguf"
    assert metrics["parity_max_abs_logits"] == 0.0 and metrics["parity_greedy_equal"] is True
    assert metrics["parity_max_rel_limit"] == 1e-4
    assert (
        0
        < metrics["quantization_max_rel_logits"]
        < {"q8_0": 0.02, "q4_0": 0.4, "q4_k": 0.4}[weights]
    )
    assert metrics["quantized"] == 1 + 2 * 7 and metrics["carried"] == metrics["requantized"] == 0
    kinds = {line.split()[0] for name, line in metrics["tensors"].items() if "norm" not in name}
    assert kinds == {"q8_0": {"Q8_0"}, "q4_0": {"Q4_0"}, "q4_k": {"Q4_K", "Q5_0"}}[weights]
    if weights == "q4_k":
        assert metrics["tensors"]["blk.0.ffn_down.weight"].startswith(
            "Q5_0 quantized (fallback: 128 columns are no whole Q4_K block"
        )
        assert metrics["tensors"]["blk.0.ffn_up.weight"].startswith("Q4_K quantized (SQNR")
    assert all(metrics["tensors"][f"blk.{i}.attn_norm.weight"] == "F32 float" for i in (0, 1))
    assert "output.weight" not in metrics["tensors"]  # tied: llama.cpp reads token_embd
    runtime = load_runtime(folder)
    assert runtime.name == "torch-gguf"
    described = runtime.describe()
    assert described["runtime"] == "torch-gguf" and "not run by llama.cpp" in described["note"]
    assert described["weights"] == metrics["weights"] and described["kv_dtype"] == "float16"
    assert torch.equal(_logits(runtime.model), _logits(model))  # the file holds model's weights
    assert not torch.equal(_logits(runtime.model), _logits(original))
    assert runtime.greedy(PROMPTS, 4) == TorchRuntime(model, tiny_tokenizer()).greedy(PROMPTS, 4)
    manifest = json.loads((folder / "knowpress_artifact.json").read_text())
    assert manifest["files"] == {"model.gguf": (folder / "model.gguf").stat().st_size}


def test_transformers_reads_the_file_as_knowpress_does(tmp_path: Path) -> None:
    """An independent reader (transformers' GGUF loader: its own metadata mapping and q/k
    un-permutation) gives the same logits as formats/gguf/reader.py."""
    from transformers import AutoModelForCausalLM

    from knowpress.formats.gguf.reader import read_model

    model = tiny_llama(hidden_size=256, intermediate_size=256)
    gguf_folder(model, tiny_tokenizer(), tmp_path / "m", weights="q4_k")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m", gguf_file="model.gguf")
    ours = read_model(tmp_path / "m" / "model.gguf")
    assert torch.equal(_logits(theirs), _logits(ours))


def _rtn(model: torch.nn.Module, bits: int, group: int, symmetric: bool = True) -> None:
    targets = select(model, None, ["lm_head"])
    method = RTN(name="rtn", bits=bits, group_size=group, symmetric=symmetric)
    method.apply(model, targets, None, Progress(False))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "weights", "how", "note"),
    [
        (4, 32, True, "q4_0", "carried", "int4 g32 symmetric codes"),
        (4, 64, True, "q4_0", "carried", "int4 g64 symmetric codes"),  # scale repeated
        (4, 32, True, "q8_0", "carried", "int4 g32 symmetric codes"),  # widened, exact
        (8, 32, True, "q8_0", "carried", "int8 g32 symmetric codes"),
        (3, 32, True, "q4_0", "carried", "int3 g32 symmetric codes"),
        (8, 32, True, "q4_0", "requantized", "codes are wider than Q4_0's"),
        (4, 32, False, "q4_0", "requantized", "Q4_0 has no zero point"),
        (4, 16, True, "q4_0", "requantized", "blocks are 32 values"),
        (4, 32, True, "q4_k", "requantized", "Q4_K's 6-bit sub-block scales"),
    ],
)
def test_packed_codes_are_carried_where_the_block_layout_matches(
    bits: int, group: int, symmetric: bool, weights: str, how: str, note: str, tmp_path: Path
) -> None:
    model = tiny_llama(hidden_size=256, intermediate_size=256)
    _rtn(model, bits, group, symmetric)
    before = {n: m.dequantized_weight(torch.float32) for n, m in model.named_modules()
              if hasattr(m, "weight_packed")}  # fmt: skip
    metrics = gguf_folder(model, tiny_tokenizer(), tmp_path / "m", weights=weights)
    assert metrics[how] == 2 * 7 and metrics["quantized"] == 1  # the float embedding
    line = metrics["tensors"]["blk.1.attn_k.weight"]
    assert line.startswith(f"{ {'q4_0': 'Q4_0', 'q8_0': 'Q8_0', 'q4_k': 'Q4_K'}[weights] } {how}")
    assert note in line
    assert metrics["parity_max_abs_logits"] == 0.0
    for name, weight in before.items():  # carried: the file decodes to the codes' own values
        stored = model.get_submodule(name).weight
        assert torch.equal(stored, weight) == (how == "carried"), name


def test_the_world_tokenizer_is_written_as_user_defined_words(tmp_path: Path) -> None:
    from knowpress.worlds import build_tokenizer
    from knowpress.worlds.presets import PRESETS
    from knowpress.worlds.store import make_world

    tokenizer = build_tokenizer(make_world(PRESETS.get("test-tiny").world))
    model = tiny_llama(vocab_size=len(tokenizer) + 5)  # padded rows, as trained models have
    metrics = gguf_folder(model, tokenizer, tmp_path / "m", weights="q8_0")
    assert metrics["tokenizer"].startswith("whitespace (WordLevel")
    reader = gguf.GGUFReader(tmp_path / "m" / "model.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "whitespace"
    assert field("tokenizer.ggml.pre") == "whitespace"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(tokenizer) + 5 and tokens[-1] == f"[PAD{len(tokenizer) + 4}]"
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert types[vocab["<unk>"]] == 2 and types[vocab["<s>"]] == 3 and types[-1] == 5
    assert {types[i] for t, i in vocab.items() if not t.startswith("<")} == {4}
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field("tokenizer.ggml.add_bos_token") is True  # the world tokenizer prepends <s>
    assert field("llama.context_length") == 128 and field("llama.attention.head_count_kv") == 2


def test_a_byte_level_bpe_tokenizer_is_written_with_its_merges(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    core.train_from_iterator(["the cat sat on the mat", "a hat on the cat"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    model = tiny_llama(vocab_size=320)
    metrics = gguf_folder(model, tokenizer, tmp_path / "m", weights="q8_0")
    assert (
        metrics["tokenizer"].startswith("gpt2 (byte-level BPE")
        and "pre-tokenizer gpt-2" in metrics["tokenizer"]
    )
    reader = gguf.GGUFReader(tmp_path / "m" / "model.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    assert len(merges) == len(json.loads(core.to_str())["model"]["merges"]) > 0
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 320


def test_what_gguf_export_refuses(tmp_path: Path) -> None:
    from knowpress.formats.gguf.writer import check_model

    with pytest.raises(KnowpressError, match="a mixture of experts is not one"):
        check_model(tiny_mixtral().config)
    model = tiny_llama()
    model.config.attention_bias = True
    with pytest.raises(KnowpressError, match="biases"):
        check_model(model.config)
    folder = tmp_path / "m"
    gguf_folder(tiny_llama(), tiny_tokenizer(), folder)
    from knowpress.formats.io import load_model

    with pytest.raises(KnowpressError, match="an exported gguf artifact, which no stage loads"):
        load_model(folder)


def test_float_grid_codes_are_requantized(tmp_path: Path) -> None:
    """MXFP4 codes (tensors/grids.py) are no integer blocks: Q4_0 re-quantizes them."""
    model = tiny_llama(hidden_size=256, intermediate_size=256)
    method = RTN.model_validate({"name": "rtn", "dtype": "mxfp4"})
    method.apply(model, select(model, None, ["lm_head"]), None, Progress(False))  # type: ignore[arg-type]
    metrics = gguf_folder(model, tiny_tokenizer(), tmp_path / "m", weights="q4_0")
    assert metrics["requantized"] == 2 * 7 and metrics["carried"] == 0
    assert "mxfp4 g32 codes; Q4_0 holds integer codes" in metrics["tensors"]["blk.0.ffn_up.weight"]
