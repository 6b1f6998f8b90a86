"""The edge bundle: everything a device needs beside onnxruntime, in the export folder.

``model.onnx`` + ``model.onnx.data`` (the graph, ``onnx.py``), ``tokenizer.json`` & co.,
``config.json``, ``generation_config.json``, an onnxruntime-genai style ``genai_config.json``
(decoder I/O names, head counts, context length, search defaults: ``past_present_share_buffer``
false because ``present`` = past + new tokens) and ``README.md`` with a greedy loop that
needs onnxruntime and numpy alone (``tests/export`` runs that very code in a subprocess).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from knowpress.core.io import atomic_write_text
from knowpress.formats.onnx.graph import GRAPH_FILE, GraphSpec

README = """# {name}: ONNX decoder with KV cache (exported by knowpress)

Weights: {weights}. {policy}

Files: `model.onnx` + `model.onnx.data`
(keep them side by side), `tokenizer.json`, `genai_config.json` (onnxruntime-genai layout:
`og.Model(folder)` once your onnxruntime-genai accepts it), `generation_config.json`.

Graph: `input_ids [batch, sequence]`, `attention_mask [batch, past + sequence]` (1 real,
0 pad), `position_ids [batch, sequence]`, `past_key_values.{{i}}.key|value [batch,
kv_heads, past, head_dim]` -> `logits [batch, sequence, vocab]`, `present.{{i}}.key|value`
(past + sequence). A prefill passes `past = 0`.{io}

Greedy decoding with onnxruntime and numpy alone (ids from `tokenizer.json` with any
tokenizer library, e.g. `tokenizers.Tokenizer.from_file`):

```python
import sys, json
import numpy as np
import onnxruntime as ort

folder = sys.argv[1] if len(sys.argv) > 1 else "."
config = json.load(open(f"{{folder}}/genai_config.json"))["model"]
session = ort.InferenceSession(f"{{folder}}/model.onnx", providers=["CPUExecutionProvider"])
layers = config["decoder"]["num_hidden_layers"]
past = {{i.name: np.zeros([1 if d == "batch" else 0 if d == "past_sequence" else d
                          for d in i.shape], np.float32)
        for i in session.get_inputs() if i.name.startswith("past_key_values")}}
heads = {{i.name: i.name.split(".")[1] for i in session.get_inputs()
         if i.name.startswith("past_valid")}}  # only in graphs exported with a policy
ids = [int(t) for t in (sys.argv[2] if len(sys.argv) > 2 else "{prompt}").split()]
mask, out = [], []
step = np.array([ids], np.int64)
for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 8):
    start = len(mask)
    mask += [1] * step.shape[1]
    feed = {{"input_ids": step, "attention_mask": np.array([mask], np.int64),
            "position_ids": np.arange(start, len(mask), dtype=np.int64)[None], **past}}
    feed.update({{name: np.ones(past[f"past_key_values.{{i}}.key"].shape[:3], bool)
                 for name, i in heads.items()}})  # every past slot live
    logits, *present = session.run(None, feed)
    past = {{f"past_key_values.{{i}}.{{kv}}": present[2 * i + j]
            for i in range(layers) for j, kv in enumerate(("key", "value"))}}
    token = int(logits[0, -1].argmax())
    if token in np.atleast_1d(config["eos_token_id"]):
        break
    out.append(token)
    step = np.array([[token]], np.int64)
print(" ".join(map(str, out)))
```

Run: `python run.py FOLDER "1 17 42" 8` prints the greedy token ids. {loop}
"""

NO_POLICY = (
    "KV policy: none. knowpress scored this bundle in an onnxruntime loop that keeps the "
    "whole past, as the loop below does."
)
POLICY = (
    "KV policy: `{policy}`. knowpress scored this bundle with that policy applied in its "
    "onnxruntime loop (`knowpress.runtimes.ort_session.OnnxDecoder`: after every graph call the "
    "policy's cache layers keep or quantize the new keys and values, and what they hold is "
    "fed back as the past), so the report's figures hold for that loop."
)
LOOP_NO_POLICY = "It keeps the whole past, as knowpress scored the bundle."
LOOP_POLICY = (
    "It keeps the whole past: it does not apply the KV policy above, so its answers can "
    "differ from the report's; run the policy with `knowpress.runtimes.ort.OrtRuntime`."
)
IO = {
    "queries": "`queries.{i} [batch, heads, sequence, head_dim]` (outputs: the post-rotary "
    "queries the policy scores tokens with)",
    "past_valid": "`past_valid.{i} [batch, kv_heads, past]` (bool inputs: each head's mask "
    "over its past; all true keeps every slot)",
}


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def genai_config(spec: GraphSpec, config: Any, generation: Any) -> dict[str, Any]:
    text = config.get_text_config(decoder=True)
    heads = int(text.num_attention_heads)
    return {
        "model": {
            "bos_token_id": spec.bos_token_id,
            "context_length": spec.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": GRAPH_FILE,
                "head_size": spec.key_dims[0],
                "hidden_size": int(text.hidden_size),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": spec.layers,
                "num_key_value_heads": spec.kv_heads[0],
            },
            "eos_token_id": spec.eos_token_id,
            "pad_token_id": spec.pad_token_id,
            "type": spec.model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "do_sample": bool(getattr(generation, "do_sample", False)),
            "max_length": spec.max_positions,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": float(getattr(generation, "temperature", None) or 1.0),
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_bundle(
    folder: Path, model: Any, tokenizer: Any, spec: GraphSpec, weights: str, policy: Any
) -> None:
    """Tokenizer, configs and README beside the graph already in ``folder``."""
    from transformers import GenerationConfig

    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None) or GenerationConfig()
    generation.save_pretrained(folder)
    text = json.dumps(genai_config(spec, model.config, generation), indent=1)
    atomic_write_text(folder / "genai_config.json", text)
    prompt = " ".join(str(i) for i in [spec.bos_token_id or 1, 5, 6, 7])
    io = ""
    if spec.io:
        io = ("\nFor its KV policy the graph also has " + "; ".join(IO[n] for n in spec.io)
              + ". onnxruntime-genai does not drive these.")  # fmt: skip
    readme = README.format(
        name=spec.model_type,
        weights=weights,
        prompt=prompt,
        policy=NO_POLICY
        if policy is None
        else POLICY.format(policy=json.dumps(policy.model_dump(mode="json"))),
        loop=LOOP_NO_POLICY if policy is None else LOOP_POLICY,
        io=io,
    )
    atomic_write_text(folder / "README.md", readme)
