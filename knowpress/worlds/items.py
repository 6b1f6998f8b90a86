"""The plain records a fact world hands out: questions, training passages, people."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QAItem:
    """One question: ``prompt`` ends with ``"A:"``; the model should continue with ``answer``.

    ``context`` is set when the prompt reads a passage first (``long_context``): then
    ``prompt == context + " " + question``, so a runtime can prefill the context under a KV
    policy before it sees the question (``question``).
    """

    prompt: str
    answer: str
    subject: str
    attribute: str
    context: str | None = field(default=None, kw_only=True)

    @property
    def question(self) -> str:
        """The prompt after its context (the whole prompt when there is none)."""
        if self.context is None:
            return self.prompt
        return self.prompt[len(self.context) + 1 :]


@dataclass(frozen=True)
class Passage:
    """A training passage: biographies of fictional people, then questions answered in them.

    Each question's ``prompt`` is the question alone; the trainer renders
    ``<s> context q1 a1 </s> q2 a2 </s> ...`` (``training.encode_passages``).
    """

    context: str
    questions: tuple[QAItem, ...]

    def text(self) -> str:
        return " ".join([self.context, *(f"{q.prompt} {q.answer}" for q in self.questions)])


@dataclass(frozen=True)
class Person:
    """A person: unique ``first middle last`` name and one value per world attribute."""

    first: str
    middle: str
    last: str
    values: dict[str, str] = field(hash=False)

    @property
    def name(self) -> str:
        return f"{self.first} {self.middle} {self.last}"
