"""``-q``: no progress bars, ours or the libraries' (transformers, datasets, huggingface_hub,
and every plain ``tqdm`` bar, e.g. compressed-tensors' while it compresses a model).

Libraries read their switches in two ways: environment variables at import time
(``TQDM_DISABLE``, ``HF_DATASETS_DISABLE_PROGRESS_BARS``, ``HF_HUB_DISABLE_PROGRESS_BARS``),
and functions after it. :func:`quiet_libraries` does both for the command's duration and
puts everything back after it (``main`` may run several commands in one process, as tests
do). A bar built while it is active is created disabled, so nothing reaches the terminal.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

ENV_SWITCHES = {
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@contextmanager
def _environment() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in ENV_SWITCHES}
    os.environ.update(ENV_SWITCHES)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _tqdm_disabled() -> Iterator[None]:
    """Every ``tqdm`` bar built meanwhile is disabled (tqdm read ``TQDM_DISABLE`` once, when
    it was imported, so a process that imported it already needs this)."""
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original  # type: ignore[method-assign]


@contextmanager
def _library_bars() -> Iterator[None]:
    """The switches of libraries already imported (later imports read the environment)."""
    undo = []
    for package, module_name in (("datasets", "datasets.utils.tqdm"),
                                 ("huggingface_hub", "huggingface_hub.utils.tqdm")):  # fmt: skip
        if package not in sys.modules:
            continue
        module = importlib.import_module(module_name)
        if not module.are_progress_bars_disabled():
            module.disable_progress_bars()
            undo.append(module.enable_progress_bars)
    try:
        yield
    finally:
        for restore in undo:
            restore()


@contextmanager
def quiet_libraries(quiet: bool) -> Iterator[None]:
    """With ``quiet``: the library switches above, for the block's duration."""
    with ExitStack() as stack:
        if quiet:
            stack.enter_context(_environment())
            stack.enter_context(_tqdm_disabled())
            stack.enter_context(_library_bars())
        yield


def hide_library_output() -> None:
    """Always, for commands that load models: transformers' own load reports and bars would
    drown ours (``-q`` or not)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
