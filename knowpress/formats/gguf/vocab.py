"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``), so llama.cpp tokenizes as the
model was trained.

- **WordLevel** (knowpress's fact-world tokenizers: one token per word or punctuation run):
  ``tokenizer.ggml.model = "whitespace"`` with ``tokenizer.ggml.pre = "whitespace"`` (llama.cpp
  since its whitespace pre-tokenizer, PR #18756, January 2026; older builds refuse the
  file), every word a ``USER_DEFINED`` token: llama.cpp cuts user-defined tokens out of the
  text before anything else, longest first, so every in-vocabulary word gets its own id
  whatever surrounds it (``born?`` -> ``born``, ``?``). A placeholder merge is written because
  the model needs the key (the gguf writer drops an empty list). Merges that rebuild each
  word character by character (``h e``, ``he l``, ...) are not enough: BPE applies the
  lowest-ranked pair first, and a pair from another word (``o r`` inside ``born``) leaves a
  piece no merge continues; on bios-dense-tiny's 843 words that gave 46 words and 64 of 80
  texts other ids than the Hugging Face tokenizer (0 with user-defined tokens). Words
  outside the vocabulary differ: Hugging Face gives ``<unk>``, llama.cpp the in-vocabulary
  pieces it finds inside them (or drops the characters). Detokenized text has no spaces
  between words.
- **Byte-level BPE** (GPT-2, Llama 3 style): ``gpt2`` with the merges, through the gguf
  package's ``BpeVocab`` and ``SpecialVocab`` (convert_hf_to_gguf's own); the
  pre-tokenizer is named when its split pattern is GPT-2's (``gpt-2``) or Llama 3's
  (``llama-bpe``), else ``default`` (llama.cpp's GPT-2-like split; the details say so).
- **SentencePiece-style BPE** (byte fallback, Llama 2 / Mistral): ``llama`` through
  ``LlamaHfVocab``.

The token list is padded with ``[PAD{i}]`` (``UNUSED``) to the embedding's rows, as
convert_hf_to_gguf does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from knowpress.core.errors import KnowpressError

#: llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5
#: a merge the whitespace model needs to load; it joins two control characters
PLACEHOLDER_MERGE = "\u0001 \u0002"

#: split patterns of byte-level pre-tokenizers -> llama.cpp's tokenizer.ggml.pre
_LLAMA3 = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_PRE_PATTERNS = {_LLAMA3: "llama-bpe"}


def add_vocab(writer: Any, tokenizer: Any, rows: int) -> str:
    """Write ``tokenizer``'s vocabulary, merges and special ids into ``writer`` (a
    ``GGUFWriter``), padded to ``rows`` tokens; returns one line saying how."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise KnowpressError(
                "gguf: the tokenizer has no tokenizer.json (a slow tokenizer); GGUF export "
                "writes WordLevel, byte-level BPE and SentencePiece-style tokenizer.json files"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        kind = data.get("model", {}).get("type")
        if kind == "WordLevel":
            return _word_level(writer, tokenizer, data, rows)
        if kind == "BPE":
            return _bpe(writer, Path(tmp), data, rows)
    raise KnowpressError(
        f"gguf: a {kind} tokenizer has no GGUF vocabulary here (WordLevel, byte-level BPE "
        "and SentencePiece-style BPE are written); export with format: onnx"
    )


def _ids(tokenizer: Any) -> dict[str, int | None]:
    return {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front / EOS at the end (its post-processor)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id]
    eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and (
        full[-1:] == [tokenizer.eos_token_id]
    )  # fmt: skip
    return bool(bos), bool(eos)


def _padded(tokens: list[str], types: list[int], rows: int) -> tuple[list[str], list[int]]:
    if len(tokens) > rows:
        raise KnowpressError(
            f"gguf: the tokenizer has {len(tokens):,} tokens but the embedding {rows:,} rows; "
            "llama.cpp needs one row per token"
        )
    extra = range(len(tokens), rows)
    return tokens + [f"[PAD{i}]" for i in extra], types + [UNUSED] * len(extra)


def _word_level(writer: Any, tokenizer: Any, data: dict[str, Any], rows: int) -> str:
    vocab: dict[str, int] = tokenizer.get_vocab()
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise KnowpressError("gguf: the WordLevel vocabulary's ids are not 0..n-1 without gaps")
    ids = _ids(tokenizer)
    special = set(tokenizer.all_special_ids)
    types = [
        UNKNOWN if i == ids["unk"] else CONTROL if i in special else USER_DEFINED
        for _, i in ordered
    ]
    tokens, types = _padded([t for t, _ in ordered], types, rows)
    writer.add_tokenizer_model("whitespace")
    writer.add_tokenizer_pre("whitespace")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([PLACEHOLDER_MERGE])
    _special_ids(writer, ids, *_adds(tokenizer))
    pre = (data.get("pre_tokenizer") or {}).get("type")
    return (
        f"whitespace (WordLevel, {len(ordered):,} words as user-defined tokens; "
        f"Hugging Face pre-tokenizer {pre})"
    )


def _special_ids(writer: Any, ids: dict[str, int | None], bos: bool, eos: bool) -> None:
    for name, value in ids.items():
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(eos)


def _bpe(writer: Any, folder: Path, data: dict[str, Any], rows: int) -> str:
    import gguf

    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    vocab: Any
    try:
        if byte_level:
            vocab, model = gguf.vocab.BpeVocab(folder), "gpt2"
        else:
            vocab, model = gguf.vocab.LlamaHfVocab(folder), "llama"
    except (FileNotFoundError, TypeError, ValueError) as exc:
        raise KnowpressError(
            f"gguf: this BPE tokenizer has no GGUF vocabulary here ({exc}); export with "
            "format: onnx"
        ) from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        scores.append(float(score))
        types.append(int(kind))
    n = len(tokens)
    tokens, types = _padded(tokens, types, rows)
    scores += [-1000.0] * (rows - n)
    writer.add_tokenizer_model(model)
    note = ""
    if model == "gpt2":
        pre = _pre_name(data)
        writer.add_tokenizer_pre(pre)
        note = f", pre-tokenizer {pre}" + (
            " (not recognised: llama.cpp splits text with its default pattern, which may "
            "tokenize differently)" if pre == "default" else ""
        )  # fmt: skip
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=rows).add_to_gguf(
        writer, quiet=True
    )
    what = "byte-level BPE" if model == "gpt2" else "SentencePiece-style BPE"
    return f"{model} ({what}, {n:,} tokens{note})"


def _pre_name(data: dict[str, Any]) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer of ``tokenizer.json``."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "Split":
            pattern = (part.get("pattern") or {}).get("Regex")
            if pattern in _PRE_PATTERNS:
                return _PRE_PATTERNS[pattern]
        if part.get("type") == "ByteLevel" and part.get("use_regex", True) and len(parts) == 1:
            return "gpt-2"
    return "default"
