"""A scripted stand-in for ``runtime.OnnxWhisper``, for decoding and streaming unit tests.

It implements the ``WhisperModel`` protocol over a tiny synthetic vocabulary (256 byte
tokens, then Whisper's control tokens, then two timestamps) and checks every call against
the protocol: int64 ``[B, N]`` tokens, equal ``N`` and ``P`` for every row, cache and
cross rows that match, at most ``n_text_ctx`` positions.

Each utterance follows a *script*: a function from the tokens decoded so far (after
``<|notimestamps|>``) to ``{token: logit}`` (every other token gets ``-30``). At the SOT
position a ``sot`` function gives the language and no-speech logits instead.

The self-attention "cache" stores token ids (``k[0, b, p, 0]``) so a script sees the
whole history; cross K/V hold the utterance key.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asr.whisper import mel as melmod
from asr.whisper.model import CrossKV, ModelDims, SelfKV
from asr.whisper.tokenizer import WhisperTokenizer, bytes_to_unicode

SPECIALS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>",
    "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
    "<|0.00|>", "<|0.02|>",
]  # fmt: skip
EOT = 256
SOT = 257
LANG = {"en": 258, "de": 259, "fr": 260}
TRANSLATE = 261
TRANSCRIBE = 262
SOT_PREV = 264
NO_SPEECH = 265
NO_TIMESTAMPS = 266
TIMESTAMP = 267
N_VOCAB = 256 + len(SPECIALS)
SUPPRESSED = ord("#")  # stands for the checkpoint's non-speech symbols
BLANK = ord(" ")
FLOOR = -30.0

Script = Callable[[tuple[int, ...]], dict[int, float]]


def write_vocabulary(directory: Path) -> Path:
    """Write ``vocabulary.txt``, ``tokenizer.json`` and ``config.json`` (no merges, so
    text encodes byte by byte)."""
    b2u = bytes_to_unicode()
    vocab = [b2u[b] for b in range(256)] + SPECIALS
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocabulary.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer.json").write_text(
        json.dumps({
            "model": {"vocab": {b2u[b]: b for b in range(256)}, "merges": []},
            "added_tokens": [{"id": 256 + i, "content": s} for i, s in enumerate(SPECIALS)],
        }),
        encoding="utf-8",
    )
    (directory / "config.json").write_text(
        json.dumps({"suppress_ids": [SUPPRESSED, SOT, SOT_PREV, NO_SPEECH],
                    "suppress_ids_begin": [BLANK, EOT], "lang_ids": list(LANG.values())}),
        encoding="utf-8",
    )
    return directory


def text_ids(text: str) -> list[int]:
    """Byte ids of ``text`` (the synthetic vocabulary has no merges)."""
    return list(text.encode("utf-8"))


def say(text: str, p: float = 0.9) -> Script:
    """A script that spells ``text`` then ends, each step with probability about ``p``."""
    ids = text_ids(text)

    def script(hist: tuple[int, ...]) -> dict[int, float]:
        k = len(hist)
        want = ids[k] if k < len(ids) and list(hist) == ids[:k] else EOT
        return {want: float(np.log(p)), ord("?"): float(np.log(1 - p))}

    return script


def say_timed(text: str, p: float = 0.9) -> Script:
    """Like :func:`say`, in timestamp mode: ``<|0.00|>`` text ``<|0.02|>`` then the end."""
    ids = [TIMESTAMP, *text_ids(text), TIMESTAMP + 1]
    return say_ids(ids, p)


def say_ids(ids: list[int], p: float = 0.9) -> Script:
    """A script that emits ``ids`` (any tokens) then ends."""

    def script(hist: tuple[int, ...]) -> dict[int, float]:
        k = len(hist)
        want = ids[k] if k < len(ids) and list(hist) == ids[:k] else EOT
        return {want: float(np.log(p)), ord("?"): float(np.log(1 - p))}

    return script


def table(
    probs: dict[tuple[int, ...], dict[int, float]], default: dict[int, float] | None = None
) -> Script:
    """A script given as probabilities per history; other histories get ``default``
    (end of text unless given)."""

    def script(hist: tuple[int, ...]) -> dict[int, float]:
        p = probs.get(hist, default or {EOT: 1.0})
        return {t: float(np.log(v)) for t, v in p.items()}

    return script


@dataclass
class Utt:
    """What the fake does for one utterance."""

    script: Script
    lang: str = "en"
    no_speech: float = 0.01  # probability at the SOT position
    # Optional: a different script when the prompt (text after <|startofprev|>) contains
    # a key; stands for hotword biasing.
    biased: dict[str, Script] = field(default_factory=dict)


@dataclass
class Call:
    rows: int
    n: int
    p: int


class ScriptedWhisper:
    """The fake model. Register utterances by key (``add``) or by audio (``add_audio``)."""

    def __init__(self, model_dir: Path, *, multilingual: bool = True, n_text_ctx: int = 64,
                 name: str = "fake") -> None:
        self.name = name
        self.multilingual = multilingual
        self.model_dir = model_dir
        self.dims = ModelDims(
            n_mels=80, n_audio_ctx=1500, n_audio_state=1, n_audio_head=1, n_audio_layer=1,
            n_vocab=N_VOCAB, n_text_ctx=n_text_ctx, n_text_state=1, n_text_head=1,
            n_text_layer=1,
        )
        self.utts: dict[float, Utt] = {}
        # If set, every mel row is keyed by its count of non-silent frames instead, and
        # this gives the utterance for that count (for growing-audio streaming tests).
        self.by_frames: Callable[[int], Utt] | None = None
        self.encode_calls: list[tuple[int, ...]] = []
        self.calls: list[Call] = []

    def add(self, key: float, utt: Utt) -> CrossKV:
        """Register ``utt`` under ``key``; returns a one-row cross K/V for it."""
        self.utts[float(key)] = utt
        k = np.full((1, 1, 1, 1), float(key), np.float32)
        return CrossKV(k, k.copy())

    def add_audio(self, audio: np.ndarray, utt: Utt, frames: int = melmod.N_FRAMES) -> None:
        """Register ``utt`` for whatever audio has this log-mel (at ``frames``)."""
        self.utts[self._key(melmod.log_mel_spectrogram(audio, pad_to_frames=frames))] = utt

    @staticmethod
    def _key(mel_row: np.ndarray) -> float:
        # Below 2**20 so that float32 holds it exactly.
        return float(zlib.crc32(np.ascontiguousarray(mel_row, np.float32).tobytes()) % (1 << 20))

    def encode(self, mel: np.ndarray) -> CrossKV:
        assert mel.dtype == np.float32 and mel.ndim == 3 and mel.shape[1] == 80
        assert mel.shape[2] % 2 == 0 and mel.shape[2] <= 3000
        self.encode_calls.append(mel.shape)
        if self.by_frames is not None:
            # Frames above the floor of their row: the audio length in 10 ms frames.
            live = [int((m.max(axis=0) > m.min() + 1e-3).sum()) for m in mel]
            for n in live:
                self.utts[float(n)] = self.by_frames(n)
            keys = np.array(live, np.float32).reshape(1, -1, 1, 1)
        else:
            keys = np.array([self._key(m) for m in mel], np.float32).reshape(1, -1, 1, 1)
        return CrossKV(keys, keys.copy())

    def decode(
        self, tokens: np.ndarray, cache: SelfKV | None, cross: CrossKV
    ) -> tuple[np.ndarray, SelfKV]:
        assert tokens.dtype == np.int64 and tokens.ndim == 2 and tokens.shape[1] >= 1
        b, n = tokens.shape
        assert cross.k.shape[1] == b, (cross.k.shape, tokens.shape)
        if cache is None:
            hist = np.zeros((b, 0), np.int64)
        else:
            assert cache.k.shape[:2] == (1, b)
            hist = cache.k[0, :, :, 0].astype(np.int64)
        full = np.concatenate([hist, tokens], axis=1)
        assert full.shape[1] <= self.dims.n_text_ctx
        self.calls.append(Call(b, n, hist.shape[1]))
        logits = np.full((b, N_VOCAB), FLOOR, np.float32)
        for r in range(b):
            utt = self.utts[round(float(cross.k[0, r, 0, 0]), 2)]
            logits[r] = self._row_logits(utt, [int(t) for t in full[r]])
        k = full.astype(np.float32)[None, :, :, None]
        return logits, SelfKV(k, k.copy())

    def _row_logits(self, utt: Utt, hist: list[int]) -> np.ndarray:
        out = np.full(N_VOCAB, FLOOR, np.float32)
        assert SOT in hist, hist
        if hist[-1] == SOT:
            # Language and no-speech: probabilities at the SOT position.
            out[LANG[utt.lang]] = np.log(0.9 * (1 - utt.no_speech))
            other = next(c for c in LANG if c != utt.lang)
            out[LANG[other]] = np.log(0.1 * (1 - utt.no_speech))
            out[NO_SPEECH] = np.log(utt.no_speech)
            return out
        sot = hist.index(SOT)
        if NO_TIMESTAMPS in hist:
            start = hist.index(NO_TIMESTAMPS) + 1
        elif len(hist) > sot + 2 and hist[sot + 2] in (TRANSLATE, TRANSCRIBE):
            start = sot + 3  # timestamp mode: text right after the task token
        else:
            out[NO_TIMESTAMPS] = 0.0  # mid-prompt; never sampled from
            return out
        prompt = bytes(t for t in hist[:sot] if t < 256).decode("utf-8", "replace")
        script = utt.script
        for word, alt in utt.biased.items():
            if word in prompt:
                script = alt
        text = tuple(hist[start:])
        for t, v in script(text).items():
            out[t] = v
        return out


def make(tmp: Path, **kw: object) -> tuple[ScriptedWhisper, WhisperTokenizer]:
    """A fake model and its tokenizer in ``tmp``."""
    d = write_vocabulary(tmp / "vocab")
    model = ScriptedWhisper(d, **kw)  # type: ignore[arg-type]
    tok = WhisperTokenizer.from_dir(d, multilingual=model.multilingual)
    return model, tok
