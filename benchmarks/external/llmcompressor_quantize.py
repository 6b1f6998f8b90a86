"""llm-compressor called directly (run inside a venv with llmcompressor 0.14), for
benchmarks/quantize.py: GPTQ (``GPTQModifier``) or RTN (``QuantizationModifier``) with
int weights in groups (symmetric, or ``--asym``: zero points), every Linear but the head
(``--mixed``: attention projections at 8 bits, the MLP at ``--bits``); saved compressed
(compressed-tensors pack-quantized, which knowpress loads). Prints one JSON line with the
seconds of the ``oneshot`` call.

    python llmcompressor_quantize.py MODEL OUT --calib calib.json --bits 4 --group 32
        --method gptq|rtn [--damp 0.01] [--asym] [--mixed]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--calib", required=True, help="JSON list of token id lists")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--mixed", action="store_true", help="attention W8, MLP W{bits}")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = json.loads(Path(args.calib).read_text())

    def weights(bits: int) -> dict:
        return {"num_bits": bits, "type": "int", "symmetric": not args.asym,
                "strategy": "group", "group_size": args.group}  # fmt: skip

    if args.mixed:
        groups = {
            "attention": {"targets": [r"re:.*self_attn\..*_proj$"], "weights": weights(8)},
            "mlp": {"targets": [r"re:.*mlp\..*_proj$"], "weights": weights(args.bits)},
        }
    else:
        groups = {"group_0": {"targets": ["Linear"], "weights": weights(args.bits)}}
    if args.method == "gptq":
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"],
                              dampening_frac=args.damp)  # fmt: skip
    else:
        recipe = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=max(map(len, ids)),
            num_calibration_samples=len(ids))  # fmt: skip
    seconds = time.perf_counter() - start
    out = Path(args.out)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"seconds": seconds, "stored_bytes": stored}))


if __name__ == "__main__":
    main()
