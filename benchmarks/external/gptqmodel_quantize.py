"""GPTQModel called directly (run inside a venv with gptqmodel), for benchmarks/quantize.py.

Quantizes a local HF model folder with GPTQModel's GPTQ on the given calibration token ids,
times the quantize call alone, saves the GPTQ-format checkpoint, and also writes a dense copy
whose linear weights are GPTQModel's dequantized ones, so knowpress (which does not import
gptqmodel) scores exactly what GPTQModel stored. Prints one JSON line.

    python gptqmodel_quantize.py MODEL OUT --calib calib.json --bits 4 --group 128 [--sym]
        [--act-order] [--damp 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--calib", required=True, help="JSON list of token id lists")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--sym", action="store_true")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--damp", type=float, default=0.01)
    args = parser.parse_args()

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    ids = json.loads(Path(args.calib).read_text())
    calibration = [{"input_ids": seq, "attention_mask": [1] * len(seq)} for seq in ids]
    config = QuantizeConfig(bits=args.bits, group_size=args.group, sym=args.sym,
                            desc_act=args.act_order, damp_percent=args.damp)  # fmt: skip
    model = GPTQModel.load(args.model, quantize_config=config, device="cpu")
    start = time.perf_counter()
    model.quantize(calibration, batch_size=8, calibration_data_min_length=2)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    model.save(str(out / "gptq"))
    stored = sum(f.stat().st_size for f in (out / "gptq").glob("*.safetensors"))
    quantized = GPTQModel.load(str(out / "gptq"), device="cpu")  # as a user would run it
    dense = _in_original_layout(_dense_copy(quantized), args.model)
    dense.save_pretrained(out / "dense")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(args.model).save_pretrained(out / "dense")
    print(json.dumps({"seconds": seconds, "stored_bytes": stored, "torch": torch.__version__}))


def _dense_copy(model):  # type: ignore[no-untyped-def]
    """The HF model with every GPTQ module replaced by an nn.Linear of its dequantized weight."""
    import torch
    from torch import nn

    hf = model.model
    for name, module in list(hf.named_modules()):
        dequantize = getattr(module, "dequantize_weight", None)
        if not callable(dequantize):
            continue
        weight = dequantize().T.contiguous().float()  # GPTQ kernels store [in, out]
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.float())
        hf.set_submodule(name, linear)
    hf.config.quantization_config = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    return hf.float()


def _in_original_layout(dense, original: str):  # type: ignore[no-untyped-def]
    """The original architecture loaded from ``original`` with every weight taken from
    ``dense``. GPTQModel splits transformers 5's fused expert tensors into one linear per
    expert (``experts.{j}.gate_proj / up_proj / down_proj``); they are stacked back into
    ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``."""
    import torch
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    source = dense.state_dict()
    state = {}
    for name, tensor in target.state_dict().items():
        module, _, attr = name.rpartition(".")
        if name in source:
            state[name] = source[name]
        elif attr == "gate_up_proj":
            n = tensor.shape[0]
            state[name] = torch.stack([torch.cat([source[f"{module}.{j}.gate_proj.weight"],
                                                  source[f"{module}.{j}.up_proj.weight"]])
                                       for j in range(n)])  # fmt: skip
        elif attr == "down_proj" and tensor.dim() == 3:
            n = tensor.shape[0]
            state[name] = torch.stack([source[f"{module}.{j}.down_proj.weight"] for j in range(n)])
        else:
            raise KeyError(f"{name}: not in GPTQModel's model")
        if state[name].shape != tensor.shape:
            raise ValueError(f"{name}: {tuple(state[name].shape)} != {tuple(tensor.shape)}")
    target.load_state_dict(state)
    return target


if __name__ == "__main__":
    main()
