"""A word-level tokenizer for a world, built offline and deterministically.

Model: ``tokenizers`` WordLevel over the ``Whitespace`` pre-tokenizer (regex
``\\w+|[^\\w\\s]+``), so every name part and value word is exactly one token.
Vocabulary = the four special tokens (ids 0-3: ``<unk> <s> </s> <pad>``) followed by every
word of the world -- pool values, name parts, all templates (held-out ones included, so
held-out questions never hit ``<unk>``) and the rendered training/held-out text -- sorted by
Python string order. Sorting (not frequency) makes ``tokenizer.json`` byte-identical for
the same world. The post-processor prepends ``<s>``; ``</s>`` is appended by the training
collator so generation stops after an answer. Decoding joins tokens with single spaces
(``"born ?"``); answer normalisation removes that difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer, models, pre_tokenizers, processors

from knowpress.worlds import words
from knowpress.worlds.generator import World
from knowpress.worlds.templates import fragments

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
DEFAULT_MAX_LENGTH = 256


def world_vocabulary(world: World) -> list[str]:
    """Sorted words of ``world`` (special tokens excluded); see the module doc for sources."""
    splitter = pre_tokenizers.Whitespace()
    texts: list[str] = []
    for attribute in world.config.attributes:
        texts.extend(world.value_pool(attribute))
    texts.extend([*words.FIRST_NAMES, *words.LAST_NAMES])
    for template in world.template_words():
        texts.extend(fragments(template))
    texts.extend(world.training_texts())
    texts.extend(world.heldout_texts())
    found: set[str] = set()
    for text in texts:
        found.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    return sorted(found - set(SPECIAL_TOKENS))


def build_tokenizer(
    world: World, model_max_length: int = DEFAULT_MAX_LENGTH
) -> PreTrainedTokenizerFast:
    """A fast tokenizer with BOS/EOS/PAD/UNK set and a post-processor that prepends BOS."""
    from transformers import PreTrainedTokenizerFast  # imported here: it pulls in torch

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *world_vocabulary(world)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
    )
    return tokenizer
