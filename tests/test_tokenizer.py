"""CPU tests for dsv4.tokenizer: tiny BPE, HF-style files, wrapper and streaming decoder."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from dsv4 import tokenizer as tk
from dsv4.tokenizer import (
    DSV4_SPECIAL_TOKENS,
    IncrementalDecoder,
    Tokenizer,
    build_tiny_tokenizer,
    save_tokenizer_files,
)

VOCAB = 512

MULTILINGUAL = {
    "english": "The quick brown fox jumps over the lazy dog, doesn't it?  Twice-spaced.",
    "chinese": "该助手为DeepSeek，由深度求索公司创造。今天是2025年10月17日，星期五。",
    "japanese": "東京は日本の首都です。ひらがな、カタカナ、漢字を使います。",
    "arabic": "مرحبا بالعالم! كيف حالك اليوم؟",
    "emoji": "Emoji 😀🎉 👍🏽 👨‍👩‍👧 🇨🇳 ❤️ 𝄞 and a lone \ufffd replacement char",
    "code": "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}\r\n    return None  \n\n",
    "whitespace_edges": "  leading and trailing spaces \t\n",
    "control_chars": "nul\x00bell\x07esc\x1bdel\x7f end",
}

CHAT_PROMPT = (
    "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>天气？<｜Assistant｜><think>ok</think>\n\n"
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="location" string="true">北京</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.tiny(VOCAB)


def _random_unicode(rng: random.Random, length: int) -> str:
    # Mix of ASCII, BMP and astral code points; surrogates are not valid in UTF-8.
    out = []
    for _ in range(length):
        hi = rng.choice([0x80, 0x800, 0x10000, 0x110000])
        cp = rng.randrange(0, hi)
        while 0xD800 <= cp <= 0xDFFF:
            cp = rng.randrange(0, hi)
        out.append(chr(cp))
    return "".join(out)


# --- build_tiny_tokenizer -------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [256 + len(DSV4_SPECIAL_TOKENS), 300, 512, 1000, 4096])
def test_tiny_vocab_size_is_exact(vocab_size: int) -> None:
    assert build_tiny_tokenizer(vocab_size).get_vocab_size(with_added_tokens=True) == vocab_size


def test_tiny_vocab_too_small_raises() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(256 + len(DSV4_SPECIAL_TOKENS) - 1)


def test_tiny_build_is_deterministic() -> None:
    first = build_tiny_tokenizer(VOCAB).to_str()
    tk._tiny_tokenizer_json.cache_clear()
    assert build_tiny_tokenizer(VOCAB).to_str() == first


def test_tiny_build_is_fast() -> None:
    tk._tiny_tokenizer_json.cache_clear()
    t0 = time.perf_counter()
    build_tiny_tokenizer(VOCAB)
    assert time.perf_counter() - t0 < 1.0


def test_tiny_build_returns_independent_objects() -> None:
    a = build_tiny_tokenizer(VOCAB)
    a.add_tokens(["zzz-not-in-b"])
    assert build_tiny_tokenizer(VOCAB).token_to_id("zzz-not-in-b") is None


def test_special_token_ids_are_fixed(tok: Tokenizer) -> None:
    assert DSV4_SPECIAL_TOKENS[:3] == (
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜▁pad▁｜>",
    )
    ids = [tok.token_to_id(s) for s in DSV4_SPECIAL_TOKENS]
    assert ids == list(range(len(DSV4_SPECIAL_TOKENS)))
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)


def test_special_tokens_cover_chat_format_markers() -> None:
    for marker in ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜latest_reminder｜>",
                   "<｜action｜>", "｜DSML｜", "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>"]:
        assert marker in DSV4_SPECIAL_TOKENS


# --- encode / decode -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MULTILINGUAL))
def test_round_trip_multilingual(tok: Tokenizer, name: str) -> None:
    text = MULTILINGUAL[name]
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_random_unicode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        text = _random_unicode(rng, rng.randrange(0, 40))
        assert tok.decode(tok.encode(text)) == text


def test_round_trip_every_latin1_char(tok: Tokenizer) -> None:
    text = "".join(chr(i) for i in range(256))
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("special", DSV4_SPECIAL_TOKENS)
def test_special_token_encodes_to_one_id_and_decodes_back(tok: Tokenizer, special: str) -> None:
    ids = tok.encode(special)
    assert ids == [tok.token_to_id(special)]
    assert tok.decode(ids) == special
    assert tok.id_to_token(ids[0]) == special


def test_special_tokens_in_chat_prompt_are_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode(CHAT_PROMPT)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    for marker in ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜DSML｜tool_calls>",
                   "</｜DSML｜tool_calls>", "｜DSML｜"]:
        assert tok.token_to_id(marker) in ids
    assert tok.decode(ids) == CHAT_PROMPT


def test_add_special_tokens_prepends_bos_once(tok: Tokenizer) -> None:
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_token_id] + tok.encode("hi")
    assert tok.encode(CHAT_PROMPT, add_special_tokens=True) == tok.encode(CHAT_PROMPT)


def test_decode_skip_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<｜User｜>hello<｜Assistant｜><think>x</think><｜end▁of▁sentence｜>")
    assert tok.decode(ids, skip_special_tokens=True) == "hellox"


def test_decode_rejects_out_of_range_id(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, VOCAB])


def test_vocab_size_property(tok: Tokenizer) -> None:
    assert tok.vocab_size == VOCAB


# --- files -----------------------------------------------------------------------------


def _save(tmp_path: Path) -> Path:
    save_tokenizer_files(tmp_path, build_tiny_tokenizer(VOCAB), model_max_length=4096)
    return tmp_path


def test_save_writes_hf_config(tmp_path: Path) -> None:
    cfg = json.loads((_save(tmp_path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert cfg["eos_token"] == "<｜end▁of▁sentence｜>"
    assert cfg["pad_token"] == "<｜▁pad▁｜>"
    assert cfg["add_bos_token"] is False
    assert cfg["model_max_length"] == 4096


def test_save_then_from_dir_round_trip(tmp_path: Path, tok: Tokenizer) -> None:
    loaded = Tokenizer.from_dir(_save(tmp_path))
    assert loaded.vocab_size == VOCAB
    assert (loaded.bos_token_id, loaded.eos_token_id) == (0, 1)
    assert loaded.encode(CHAT_PROMPT) == tok.encode(CHAT_PROMPT)
    assert loaded.decode(loaded.encode(CHAT_PROMPT)) == CHAT_PROMPT


def test_from_dir_reads_added_token_dicts_in_config(tmp_path: Path) -> None:
    d = _save(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["bos_token"] = {"__type": "AddedToken", "content": "<｜User｜>"}
    cfg["eos_token"] = {"__type": "AddedToken", "content": "<｜Assistant｜>"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    loaded = Tokenizer.from_dir(d)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (3, 4)


def test_from_dir_without_config_uses_default_bos_eos(tmp_path: Path) -> None:
    d = _save(tmp_path)
    (d / "tokenizer_config.json").unlink()
    loaded = Tokenizer.from_dir(d)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (0, 1)


def test_from_dir_missing_tokenizer_json_names_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_malformed_tokenizer_json_names_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_malformed_config_names_file(tmp_path: Path) -> None:
    d = _save(tmp_path)
    (d / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)


def test_from_dir_unknown_bos_in_config_names_file(tmp_path: Path) -> None:
    d = _save(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["bos_token"] = "<s>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)


def test_transformers_autotokenizer_loads_saved_dir(tmp_path: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(_save(tmp_path)))
    assert len(hf) == VOCAB
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.model_max_length == 4096
    assert hf.encode(CHAT_PROMPT) == tok.encode(CHAT_PROMPT)  # no extra BOS
    assert hf.decode(hf.encode(CHAT_PROMPT)) == CHAT_PROMPT


# --- IncrementalDecoder ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["emoji", "chinese", "japanese"])
def test_incremental_deltas_concatenate_to_decode(tok: Tokenizer, name: str) -> None:
    ids = tok.encode(MULTILINGUAL[name])
    dec = IncrementalDecoder(tok)
    deltas = [dec.add(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids)
    assert dec.flush() == ""


def test_incremental_deltas_never_emit_partial_characters(tok: Tokenizer) -> None:
    text = "𝄞😀👨‍👩‍👧中文"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # the tiny vocab must split these characters across tokens
    dec = IncrementalDecoder(tok)
    deltas = [dec.add(i) for i in ids]
    assert "" in deltas  # something was held back
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_incremental_deltas_on_chat_prompt(tok: Tokenizer) -> None:
    ids = tok.encode(CHAT_PROMPT)
    dec = IncrementalDecoder(tok)
    assert dec.add_many(ids) == CHAT_PROMPT
    skip = IncrementalDecoder(tok, skip_special_tokens=True)
    assert skip.add_many(ids) == tok.decode(ids, skip_special_tokens=True)


def test_incremental_random_unicode(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(50):
        ids = tok.encode(_random_unicode(rng, 30))
        dec = IncrementalDecoder(tok)
        assert dec.add_many(ids) + dec.flush() == tok.decode(ids)


def test_incremental_flush_returns_truncated_character(tok: Tokenizer) -> None:
    lead = tok.encode("😀")[0]  # first piece of a 4-byte character: incomplete on its own
    assert tok.decode([lead]).endswith("\ufffd")
    dec = IncrementalDecoder(tok)
    assert dec.add(lead) == ""
    assert dec.flush() == tok.decode([lead])


def test_incremental_skips_special_tokens_without_decoding(tok: Tokenizer) -> None:
    """Skipped special tokens add no text, even inside a split character, and never enter the
    decode window: a long run of them (a random model's placeholders) costs no decode."""
    pieces = tok.encode("😀中")
    specials = sorted(tok.special_ids)
    assert len(pieces) > 2 and specials
    rng = random.Random(3)
    ids = []
    for p in pieces:  # special ids between the pieces of multi-byte characters
        ids += [rng.choice(specials) for _ in range(rng.randrange(0, 4))] + [p]
    for skip in (False, True):
        dec = IncrementalDecoder(tok, skip_special_tokens=skip)
        assert dec.add_many(ids) + dec.flush() == tok.decode(ids, skip_special_tokens=skip)
    dec = IncrementalDecoder(tok, skip_special_tokens=True)
    calls = []
    backend = dec._decode
    dec._decode = lambda window: calls.append(len(window)) or backend(window)
    assert dec.add_many([specials[0]] * 1000) == ""
    assert calls == []
    assert dec.add_many(tok.encode("ok")) == "ok"
    assert max(calls) <= 2  # the window holds the text's ids only
    assert dec.ids[:1000] == [specials[0]] * 1000


def test_incremental_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        IncrementalDecoder(tok).add(tok.vocab_size)
