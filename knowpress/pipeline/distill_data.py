"""What a distill stage trains on: batches of token ids and the prompts on-policy steps use.

With a fact world the batches are the teacher's own training epochs
(``world.training.EpochBatches``: bios, in-context passages, QA strings, no copy
sequences), so the student sees the text the teacher's knowledge came from; the on-policy
prompts are the world's trained questions. Without a world (a user's model) the batches are
the ``data.calibration`` texts (a local file or dataset), cut to ``seq_len`` tokens, shuffled
per epoch; the on-policy prompts are the first half of each row.

``batch(step)`` and ``prompts(step)`` are pure functions of ``(seed, step)``: a resumed stage
sees the batches the killed one would have seen.
"""

from __future__ import annotations

import random
from typing import Any

from transformers import PreTrainedTokenizerBase

from knowpress.methods.distill.batches import Batch, Example, collate, encode_texts
from knowpress.teachers.training import EpochBatches


class DistillData:
    """The ``BatchSource`` a distill stage trains on (module docstring)."""

    def __init__(self, world: Any, tokenizer: PreTrainedTokenizerBase, texts: list[str] | None,
                 batch_size: int, seq_len: int, seed: int) -> None:  # fmt: skip
        from knowpress.worlds.presets import TrainConfig

        self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.world = world if texts is None else None
        if self.world is not None:
            cfg = TrainConfig(steps=1, batch_size=batch_size, seq_len=seq_len, seed=seed,
                              qa_repeat=1, warmup=0)  # fmt: skip
            self._epochs: EpochBatches | None = EpochBatches(world, tokenizer, cfg)
            self._questions = [q.prompt for q in world.questions("trained")]
        else:
            self._epochs = None
            encoded = encode_texts(texts or [], tokenizer, seq_len)
            self._rows: list[Example] = [(ids, 0) for ids in encoded if ids]
            if not self._rows:
                raise ValueError("the distill data has no text")

    @property
    def per_epoch(self) -> int:
        if self._epochs is not None:
            return self._epochs.per_epoch
        return max(1, len(self._rows) // self.batch_size)

    def rows(self, step: int) -> list[Example]:
        if self._epochs is not None:
            return self._epochs.batch(step)
        epoch, index = divmod(step, self.per_epoch)
        order = list(range(len(self._rows)))
        random.Random(f"knowpress-distill:{self.seed}:{epoch}").shuffle(order)
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        return [self._rows[i] for i in chosen or order[: self.batch_size]]

    def batch(self, step: int) -> Batch:
        return collate(self.rows(step), self.tokenizer.pad_token_id)

    def prompts(self, step: int) -> list[list[int]]:
        """Token ids of the prompts an on-policy step continues (``<s>`` first)."""
        rng = random.Random(f"knowpress-distill-prompts:{self.seed}:{step}")
        if self.world is not None and self._questions:
            texts = [rng.choice(self._questions) for _ in range(self.batch_size)]
            return self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [ids[: max(2, len(ids) // 2)] for ids, _ in self.rows(step)]
