"""The Context: what flows from stage to stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from knowpress.recipe import Recipe
    from knowpress.world import World


@dataclass
class StageRecord:
    """One finished stage, as stored in its checkpoint and in report.json."""

    index: int
    kind: str
    config: dict[str, Any]
    hash: str
    seconds: float
    peak_rss_bytes: int
    bytes_before: int
    bytes_after: int
    checkpoint: str
    resumed: bool = False
    scores: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Typed state handed to every stage.

    ``model`` is the model being compressed (a stage may replace it); ``teacher`` the frozen
    reference every retention is measured against, loaded only when a stage needs it;
    ``kv_policy`` a runtime KV-cache policy attached by a stage; ``artifacts`` non-PyTorch
    outputs (e.g. ONNX files) by name; ``metrics`` numbers a stage wants in the report.
    """

    recipe: Recipe
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    out_dir: Path
    world: World | None = None
    teacher: PreTrainedModel | None = None
    kv_policy: Any | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[StageRecord] = field(default_factory=list)
