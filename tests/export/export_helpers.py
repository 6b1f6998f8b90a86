"""Shared by the ONNX export tests: the logits an exported graph and a PyTorch model give on
the same right-padded rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowpress.runtimes.ort_session import OnnxDecoder, right_padded

ROWS = [[1, 5, 9, 17, 33, 60], [1, 7, 8]]
REAL = right_padded(ROWS, 0)[1].astype(bool)  # the rows' real positions


def graph_logits(path: Path) -> np.ndarray:
    from knowpress.runtimes.ort import read_record

    decoder = OnnxDecoder(path / "model.onnx", read_record(path)["graph"])
    ids, valid = right_padded(ROWS, 0)
    return decoder.forward(ids, valid, decoder.empty(len(ROWS)))[0]


def torch_logits(model: Any) -> np.ndarray:
    ids, valid = (torch.from_numpy(a) for a in right_padded(ROWS, 0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=valid).logits.numpy()
