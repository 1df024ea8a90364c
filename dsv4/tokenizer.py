"""Tokenizer support: a deterministic tiny byte-level BPE for tests, HF-style files, and the
engine-facing :class:`Tokenizer` wrapper with a streaming :class:`IncrementalDecoder`.

Only the ``tokenizers`` library is used at runtime; ``transformers`` merely has to be able to
load the files that :func:`save_tokenizer_files` writes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"

# Every marker the DeepSeek-V4 prompt format emits (see shared/chat_encoding/*.expected.txt).
# The order fixes the ids of the tiny tokenizer: bos=0, eos=1, pad=2 as in the real vocabulary.
# "｜DSML｜" alone covers the opening tags `<｜DSML｜invoke name=...>` / `<｜DSML｜parameter ...>`,
# whose attributes vary and so cannot be single tokens.
DSV4_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜latest_reminder｜>",
    "<｜action｜>",
    "｜DSML｜",
    "<｜DSML｜tool_calls>",
    "</｜DSML｜tool_calls>",
    "</｜DSML｜invoke>",
    "</｜DSML｜parameter>",
    "<tool_result>",
    "</tool_result>",
)

# Filler used to bring the tiny vocabulary to an exact size (DeepSeek's own reserved-slot naming).
_PLACEHOLDER = "<｜place▁holder▁no▁{}｜>"

# Small embedded multilingual corpus: it only has to give BPE some realistic merges; exact
# round-tripping of arbitrary text comes from the 256-symbol byte alphabet, not from this text.
_TINY_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. The weather in Beijing is sunny today.",
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.",
    "Hello! How can I help you? Let me think about this step by step before I answer.",
    "The user wants to know the weather. I should use the get_weather tool with the location.",
    "该助手为DeepSeek，由深度求索公司创造。今天是星期五，天气很好。世界著名温泉有哪些？",
    "我们的模型可以理解中文和英文。这是一个简单的测试句子，用来训练分词器。",
    "東京は日本の首都です。今日はいい天気ですね。ひらがなとカタカナと漢字。",
    "مرحبا بالعالم. كيف حالك اليوم؟ هذه جملة باللغة العربية.",
    "Привет, мир! Как дела? Это предложение на русском языке.",
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "Emoji: 😀 🎉 🚀 💡 ❤️ 👍🏽 👨‍👩‍👧 🇨🇳 — ok 😀😀",
    "def fibonacci(n: int) -> int:\n\tif n < 2:\n\t\treturn n\n"
    "\treturn fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n    sum += values[i];\n}\nreturn sum;\n",
    'import json\nprint(json.dumps({"name": "get_weather", "arguments": {"city": "Beijing"}}))\n',
    '{"type": "object", "properties": {"location": {"type": "string", "description": "The city"}}}',
    '<｜DSML｜invoke name="search">\n<｜DSML｜parameter name="query" string="true">x</｜DSML｜parameter>',
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2025-11-15 22°C 45% 3.14159",
)


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    # Cache the serialized form, not the object: tokenizers.Tokenizer is mutable (padding,
    # truncation, added tokens) and a shared cached instance could be altered by one caller.
    n_fixed = 256 + len(DSV4_SPECIAL_TOKENS)
    if vocab_size < n_fixed:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {n_fixed} "
            f"(256 byte symbols + {len(DSV4_SPECIAL_TOKENS)} special tokens)"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False: a prepended space would break the exact round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(DSV4_SPECIAL_TOKENS),  # trainer puts these first: ids 0..N-1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    # The corpus may run out of merges before vocab_size; the model's embedding has exactly
    # vocab_size rows, so fill the rest with reserved special tokens.
    n_pad = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if n_pad > 0:
        tok.add_special_tokens([_PLACEHOLDER.format(i) for i in range(n_pad)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    for i, s in enumerate(DSV4_SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 512) -> tokenizers.Tokenizer:
    """Build a deterministic byte-level BPE tokenizer of exactly ``vocab_size`` entries.

    No network or data files: BPE is trained on a small embedded text. Any UTF-8 string
    round-trips exactly, and :data:`DSV4_SPECIAL_TOKENS` are special tokens with ids
    ``0..len(DSV4_SPECIAL_TOKENS)-1``. Raises ``ValueError`` if ``vocab_size`` cannot hold the
    256 byte symbols plus the special tokens. Each call returns a fresh object (built once per
    size, then cached as JSON).
    """
    return tokenizers.Tokenizer.from_str(_tiny_tokenizer_json(vocab_size))


def save_tokenizer_files(
    directory: str | os.PathLike[str], tokenizer: tokenizers.Tokenizer, model_max_length: int
) -> None:
    """Write ``tokenizer.json`` and an HF-style ``tokenizer_config.json`` into ``directory``.

    The config lets ``transformers.AutoTokenizer.from_pretrained(directory)`` load it too.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        # The chat prompt already starts with the BOS string, so never add another one.
        "add_bos_token": False,
        "add_eos_token": False,
        # transformers' space clean-up (" ." -> ".") would break exact round-tripping.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (d / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


def _token_name(value: Any, path: Path, key: str) -> str | None:
    # HF configs store a special token either as a plain string or as a serialized AddedToken.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {key!r} must be a string or an object with 'content', got {value!r}")


class Tokenizer:
    """Engine-facing tokenizer: ids <-> text, with DeepSeek special tokens recognised in text."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos_token: str | None = BOS_TOKEN,
        eos_token: str | None = EOS_TOKEN,
    ) -> None:
        self._tok = tokenizer
        # get_vocab_size(with_added_tokens=True) builds the whole vocabulary (7 ms at 129K
        # entries): read it once, not on every decode of every generated token.
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._special_ids: frozenset[int] | None = None
        self._bos_id = self._lookup(bos_token)
        self._eos_id = self._lookup(eos_token)

    def _lookup(self, token: str | None) -> int | None:
        if token is None:
            return None
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return tid

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` (and ``tokenizer_config.json`` if present) from ``path``.

        Raises ``FileNotFoundError`` if ``tokenizer.json`` is missing and ``ValueError`` naming
        the file if either file is malformed.
        """
        d = Path(path)
        tok_path = d / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"malformed tokenizer file {tok_path}: {e}") from e

        bos: str | None = BOS_TOKEN if tok.token_to_id(BOS_TOKEN) is not None else None
        eos: str | None = EOS_TOKEN if tok.token_to_id(EOS_TOKEN) is not None else None
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"malformed tokenizer config {cfg_path}: {e}") from e
            if not isinstance(cfg, dict):
                raise ValueError(f"malformed tokenizer config {cfg_path}: expected a JSON object")
            if "bos_token" in cfg:
                bos = _token_name(cfg["bos_token"], cfg_path, "bos_token")
            if "eos_token" in cfg:
                eos = _token_name(cfg["eos_token"], cfg_path, "eos_token")
        try:
            return cls(tok, bos_token=bos, eos_token=eos)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from e

    @classmethod
    def tiny(cls, vocab_size: int = 512) -> Tokenizer:
        """The in-memory tiny tokenizer of :func:`build_tiny_tokenizer`."""
        return cls(build_tiny_tokenizer(vocab_size))

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def bos_token_id(self) -> int | None:
        """Id of the begin-of-sentence token (None if the tokenizer has none)."""
        return self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sentence token (None if the tokenizer has none)."""
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included."""
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Encode ``text``; special-token strings in it become their single ids.

        ``add_special_tokens=True`` prepends BOS unless the text already starts with it (the
        chat prompt carries its own BOS, and a doubled BOS is never wanted).
        """
        # The backend's own post-processor is bypassed so that BOS handling is the same for
        # the tiny tokenizer and for released tokenizer.json files that template a BOS in.
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._bos_id is not None and ids[:1] != [self._bos_id]:
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Decode ``ids`` to text; raises ``ValueError`` on ids outside the vocabulary."""
        ids = list(ids)
        n = self.vocab_size
        # The backend silently drops unknown ids; an out-of-range sample is a bug upstream.
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token ids out of range [0, {n}): {bad[:8]}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (those ``skip_special_tokens`` drops); built once."""
        if self._special_ids is None:
            self._special_ids = frozenset(
                i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string of ``token_id`` (byte-level form), or None if out of range."""
        return self._tok.id_to_token(token_id)


class IncrementalDecoder:
    """Streaming detokenizer: :meth:`add` returns the text each new token completes.

    Multi-byte UTF-8 characters split across tokens decode to U+FFFD until complete, so a
    trailing U+FFFD is held back until a later token completes it. ``"".join(deltas) +
    flush()`` equals ``tokenizer.decode(all_ids)``; ``flush()`` is empty unless the stream
    ends in genuinely invalid or truncated UTF-8.

    Cost: two backend decodes of a short window a token. With ``skip_special_tokens`` a
    special token adds no text (the backend drops special ids before its decoder runs), so it
    never enters the window and costs no decode: a run of them (a random model's placeholder
    tokens) would otherwise grow the window, and each token's decodes, without bound.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._special = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._ids: list[int] = []
        # The decode window: the ids that produce text (all but skipped specials).
        # win[_prefix:_read] is already-emitted context re-decoded together with new tokens:
        # decoding only the new tokens alone could split a character. Both offsets only move
        # to points right after complete text, where lossy UTF-8 decoding restarts cleanly.
        self._win: list[int] = []
        self._prefix = 0
        self._read = 0

    @property
    def ids(self) -> list[int]:
        """All token ids added so far."""
        return list(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token id and return the newly completed text (possibly empty)."""
        if not 0 <= token_id < self._tok.vocab_size:  # the backend would drop it silently
            raise ValueError(f"token id out of range [0, {self._tok.vocab_size}): {token_id}")
        self._ids.append(token_id)
        if token_id in self._special:
            return ""
        self._win.append(token_id)
        prefix_text = self._decode(self._win[self._prefix:self._read])
        new_text = self._decode(self._win[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete character: wait for more bytes
        self._prefix, self._read = self._read, len(self._win)
        return new_text[len(prefix_text):]

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Add several ids; return the concatenated deltas."""
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Return any held-back text (a trailing U+FFFD that was never completed)."""
        prefix_text = self._decode(self._win[self._prefix:self._read])
        new_text = self._decode(self._win[self._prefix:])
        self._prefix = self._read = len(self._win)
        return new_text[len(prefix_text):]
