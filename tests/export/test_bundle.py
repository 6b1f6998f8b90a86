"""The edge bundle: its files, a genai_config that describes the graph, and a README whose
code runs the graph with onnxruntime and numpy alone, in a fresh interpreter."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

from knowpress.runtimes.loader import load_runtime
from knowpress.testing.export import export_folder
from knowpress.testing.models import tiny_llama, tiny_tokenizer

GUARD = """
import sys
assert not {"torch", "transformers", "knowpress"} & set(sys.modules), sorted(sys.modules)
"""


def test_bundle_runs_with_onnxruntime_alone(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    with contextlib.redirect_stdout(io.StringIO()):
        export_folder(tiny_llama(), tiny_tokenizer(), folder, weights="int4")
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json",
            "generation_config.json", "genai_config.json", "README.md"} <= names  # fmt: skip
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["num_hidden_layers"] == 2 and genai["decoder"]["head_size"] == 16
    assert genai["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert code is not None
    script = tmp_path / "run.py"
    script.write_text(code.group(1) + GUARD)
    prompt = [1, 5, 6, 7]
    out = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), " ".join(map(str, prompt)), "6"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    expected = load_runtime(folder).greedy_ids([prompt], 6)[0]
    assert out.stdout.split() == [str(t) for t in expected]
