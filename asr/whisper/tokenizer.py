"""Whisper's byte-level BPE tokenizer without the ``tokenizers`` library.

The packaged checkpoints carry ``vocabulary.txt`` (one token per line, id = line number,
including the special and timestamp tokens), ``tokenizer.json`` (the BPE merges and the
added special tokens) and ``config.json`` (language ids and suppress lists).

Tokens are GPT-2 byte-level strings: every byte is mapped to a printable code point
(:func:`bytes_to_unicode`), so decoding maps the characters back to bytes, joins them and
decodes UTF-8 once for the whole sequence (a character may straddle tokens).

The multilingual and English-only vocabularies put the special tokens at different ids
(``<|endoftext|>`` is 50257 in one, 50256 in the other), so every special id is looked up
by its text, never hard-coded.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Whisper's language codes in token order (``<|en|>`` first). Used only to name
# languages; which ones a checkpoint knows is read from its vocabulary.
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen",
    "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish",
    "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy", "as": "assamese",
    "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip

_SPECIAL_RE = re.compile(r"^<\|([^|]+)\|>$")
_TIMESTAMP_RE = re.compile(r"^<\|\d+\.\d\d\|>$")


class TokenizerError(ValueError):
    """The vocabulary files are inconsistent or lack a token Whisper needs."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable code points.

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) map to
    code points from 256 up, so that no token contains whitespace or control characters.

    Returns:
        byte value -> one-character string.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _class_of(prefix: str) -> str:
    """A regex character class body for every code point whose category starts with
    ``prefix`` (the stdlib ``re`` has no ``\\p{..}``)."""
    parts = []
    start = -1
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
        if inside and start < 0:
            start = cp
        elif not inside and start >= 0:
            end = cp - 1
            parts.append(
                re.escape(chr(start)) if start == end
                else f"{re.escape(chr(start))}-{re.escape(chr(end))}"
            )
            start = -1
    return "".join(parts)


@functools.cache
def pretokenize_pattern() -> re.Pattern[str]:
    """GPT-2's pre-tokenization regex, with ``\\p{L}``/``\\p{N}`` spelled out for ``re``.

    ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``

    Built once (about 0.25 s: it walks the Unicode table).

    Returns:
        The compiled pattern.
    """
    letters = _class_of("L")
    numbers = _class_of("N")
    return re.compile(
        rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+"""
        rf"""| ?[^\s{letters}{numbers}]+|\s+(?!\S)|\s+"""
    )


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's control tokens in one vocabulary."""

    eot: int  # <|endoftext|>
    sot: int  # <|startoftranscript|>
    translate: int
    transcribe: int
    sot_lm: int  # <|startoflm|>
    sot_prev: int  # <|startofprev|>
    no_speech: int  # <|nospeech|> or, in older vocabularies, <|nocaptions|>
    no_timestamps: int
    timestamp_begin: int  # <|0.00|>; timestamps run from here to the end of the vocabulary
    languages: dict[str, int] = field(default_factory=dict)  # code -> id, in vocab order


class WhisperTokenizer:
    """Decode and encode Whisper token ids; knows the special tokens and suppress lists.

    Build it with :meth:`from_dir` (or :meth:`from_files`).
    """

    def __init__(
        self,
        vocab: Sequence[str],
        merges: Sequence[tuple[str, str]],
        config: dict[str, object],
        *,
        multilingual: bool | None = None,
    ) -> None:
        """Build a tokenizer from parsed files.

        Args:
            vocab: token strings by id (``vocabulary.txt``'s lines).
            merges: the BPE merges in priority order (``tokenizer.json``).
            config: ``config.json`` (``suppress_ids``, ``suppress_ids_begin``,
                ``lang_ids``).
            multilingual: whether the checkpoint is multilingual; by default Whisper's
                own rule, a vocabulary of at least 51865 tokens.

        Raises:
            TokenizerError: a control token is missing or the files disagree.
        """
        self.vocab: list[str] = list(vocab)
        self.n_vocab = len(self.vocab)
        self._ids: dict[str, int] = {}
        for i, tok in enumerate(self.vocab):
            self._ids.setdefault(tok, i)
        self._ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self.multilingual = self.n_vocab >= 51865 if multilingual is None else multilingual
        self.special = self._find_specials()
        # Every id from <|endoftext|> on is a control or timestamp token.
        self.first_special = self.special.eot
        self.suppress_ids: tuple[int, ...] = self._config_ids(config, "suppress_ids")
        self.suppress_ids_begin: tuple[int, ...] = self._config_ids(config, "suppress_ids_begin")
        self._check_config_languages(config)
        self._bpe_cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_files(
        cls,
        config_json: Path,
        tokenizer_json: Path,
        vocabulary_txt: Path,
        *,
        multilingual: bool | None = None,
    ) -> WhisperTokenizer:
        """Load from the three packaged files.

        Args:
            config_json: CTranslate2's ``config.json``.
            tokenizer_json: the Hugging Face ``tokenizer.json`` (only its merges and added
                tokens are read).
            vocabulary_txt: one token per line.
            multilingual: see :meth:`__init__`.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: the files are inconsistent.
            OSError: a file cannot be read.
        """
        vocab = vocabulary_txt.read_text(encoding="utf-8").split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()  # trailing newline, not a token
        tj = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        merges: list[tuple[str, str]] = []
        for m in tj["model"]["merges"]:
            # Older files store "a b", newer ones ["a", "b"].
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            merges.append((a, b))
        bpe_vocab: dict[str, int] = tj["model"]["vocab"]
        for tok, i in bpe_vocab.items():
            if i >= len(vocab) or vocab[i] != tok:
                raise TokenizerError(
                    f"{tokenizer_json} and {vocabulary_txt} disagree on id {i} ({tok!r})"
                )
        for added in tj.get("added_tokens", []):
            i, tok = int(added["id"]), str(added["content"])
            if i >= len(vocab) or vocab[i] != tok:
                raise TokenizerError(f"added token {tok!r} is not id {i} in {vocabulary_txt}")
        config = json.loads(config_json.read_text(encoding="utf-8"))
        return cls(vocab, merges, config, multilingual=multilingual)

    @classmethod
    def from_dir(cls, directory: Path, *, multilingual: bool | None = None) -> WhisperTokenizer:
        """Load from a directory holding ``config.json``, ``tokenizer.json`` and
        ``vocabulary.txt`` (a model's ``model_dir``).

        Args:
            directory: the directory.
            multilingual: see :meth:`__init__`.

        Returns:
            The tokenizer.
        """
        d = Path(directory)
        return cls.from_files(
            d / "config.json", d / "tokenizer.json", d / "vocabulary.txt",
            multilingual=multilingual,
        )

    # -- special tokens ----------------------------------------------------------------

    def _id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise TokenizerError(f"the vocabulary has no {token} token") from None

    def _find_specials(self) -> SpecialTokens:
        sot = self._id("<|startoftranscript|>")
        translate = self._id("<|translate|>")
        # Language tokens sit between <|startoftranscript|> and <|translate|>.
        languages: dict[str, int] = {}
        for i in range(sot + 1, translate):
            m = _SPECIAL_RE.match(self.vocab[i])
            if m is None:
                raise TokenizerError(f"unexpected token {self.vocab[i]!r} among languages")
            languages[m.group(1)] = i
        no_speech = self._ids.get("<|nospeech|>", self._ids.get("<|nocaptions|>"))
        if no_speech is None:
            raise TokenizerError("the vocabulary has neither <|nospeech|> nor <|nocaptions|>")
        ts = self._id("<|0.00|>")
        for i in range(ts, self.n_vocab):
            if not _TIMESTAMP_RE.match(self.vocab[i]):
                raise TokenizerError(f"non-timestamp token {self.vocab[i]!r} after <|0.00|>")
        return SpecialTokens(
            eot=self._id("<|endoftext|>"),
            sot=sot,
            translate=translate,
            transcribe=self._id("<|transcribe|>"),
            sot_lm=self._id("<|startoflm|>"),
            sot_prev=self._id("<|startofprev|>"),
            no_speech=no_speech,
            no_timestamps=self._id("<|notimestamps|>"),
            timestamp_begin=ts,
            languages=languages,
        )

    def _config_ids(self, config: dict[str, object], key: str) -> tuple[int, ...]:
        raw = config.get(key, [])
        if not isinstance(raw, list):
            raise TokenizerError(f"config {key} is not a list")
        ids = tuple(int(i) for i in raw)
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise TokenizerError(f"config {key} has ids outside the vocabulary: {bad[:5]}")
        return ids

    def _check_config_languages(self, config: dict[str, object]) -> None:
        # The English-only package's config lists ids shifted by one (its converter
        # assumed the multilingual layout); only a multilingual model uses them, so only
        # there must they agree with the vocabulary.
        raw = config.get("lang_ids")
        if self.multilingual and isinstance(raw, list):
            want = set(self.special.languages.values())
            if {int(i) for i in raw} != want:
                raise TokenizerError("config lang_ids disagree with the vocabulary's languages")

    @property
    def eot(self) -> int:
        """``<|endoftext|>``."""
        return self.special.eot

    @property
    def language_codes(self) -> tuple[str, ...]:
        """The language codes this vocabulary has tokens for, in token order."""
        return tuple(self.special.languages)

    def language_id(self, code: str) -> int:
        """The id of ``<|code|>``.

        Args:
            code: a language code such as ``"en"``.

        Returns:
            The token id.

        Raises:
            ValueError: the vocabulary has no such language.
        """
        try:
            return self.special.languages[code]
        except KeyError:
            raise ValueError(f"unknown language {code!r}") from None

    def sot_sequence(self, language: str | None = "en", task: str = "transcribe") -> list[int]:
        """The tokens that start a transcript, then ``<|notimestamps|>``.

        Multilingual: ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``.
        English-only checkpoints were trained without language and task tokens:
        ``<|startoftranscript|><|notimestamps|>``.

        Args:
            language: language code (multilingual only; required there).
            task: ``"transcribe"`` or ``"translate"`` (multilingual only).

        Returns:
            Token ids.

        Raises:
            ValueError: unknown language or task, or no language for a multilingual model.
        """
        sp = self.special
        if not self.multilingual:
            if language not in (None, "en"):
                raise ValueError(f"an English-only model cannot transcribe {language!r}")
            return [sp.sot, sp.no_timestamps]
        if language is None:
            raise ValueError("a multilingual model needs a language (detect it first)")
        tasks = {"transcribe": sp.transcribe, "translate": sp.translate}
        if task not in tasks:
            raise ValueError(f"unknown task {task!r}")
        return [sp.sot, self.language_id(language), tasks[task], sp.no_timestamps]

    def prompt_tokens(self, prompt: str, max_tokens: int) -> list[int]:
        """``<|startofprev|>`` and the last tokens of ``" " + prompt``, as Whisper builds an
        initial prompt (or hotword list) that conditions the decoder.

        Args:
            prompt: free text; empty or whitespace gives no tokens at all.
            max_tokens: keep at most this many text tokens (the most recent ones); Whisper
                uses ``n_text_ctx // 2 - 1``.

        Returns:
            Token ids (empty when there is no prompt).
        """
        text = prompt.strip()
        if not text or max_tokens <= 0:
            return []
        ids = self.encode(" " + text)
        return [self.special.sot_prev, *ids[-max_tokens:]]

    def is_special(self, token: int) -> bool:
        """Whether ``token`` is a control or timestamp token (not text)."""
        return token >= self.first_special

    # -- decode -------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Token ids to text.

        Args:
            ids: token ids.
            skip_special: drop control and timestamp tokens (else keep their ``<|..|>``
                text in place).

        Returns:
            The text; bytes that do not form valid UTF-8 become U+FFFD.

        Raises:
            ValueError: an id outside the vocabulary.
        """
        u2b = _unicode_to_byte()
        out: list[str] = []
        buf = bytearray()
        for t in ids:
            i = int(t)
            if not 0 <= i < self.n_vocab:
                raise ValueError(f"token id {i} outside the vocabulary of {self.n_vocab}")
            if i >= self.first_special:
                if skip_special:
                    continue
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(self.vocab[i])
                continue
            buf.extend(u2b[c] for c in self.vocab[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of a text token (empty for control and timestamp tokens)."""
        if token >= self.first_special:
            return b""
        u2b = _unicode_to_byte()
        return bytes(u2b[c] for c in self.vocab[token])

    # -- encode -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text to token ids with byte-level BPE, as Whisper's tokenizer does.

        Special-token text such as ``"<|en|>"`` is encoded as ordinary text, never as the
        control token, so user prompts cannot inject control tokens.

        Args:
            text: any text.

        Returns:
            Token ids (no control tokens).
        """
        b2u = bytes_to_unicode()
        out: list[int] = []
        for piece in pretokenize_pattern().findall(text):
            word = "".join(b2u[b] for b in piece.encode("utf-8"))
            out.extend(self._bpe(word))
        return out

    def _bpe(self, word: str) -> tuple[int, ...]:
        hit = self._bpe_cache.get(word)
        if hit is not None:
            return hit
        parts = list(word)
        ranks = self._ranks
        while len(parts) > 1:
            # Merge the lowest-ranked adjacent pair everywhere it occurs, as GPT-2 does.
            best_rank = None
            best = ("", "")
            for pair in itertools.pairwise(parts):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best_rank is None:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = tuple(self._id_of_piece(p) for p in parts)
        if len(self._bpe_cache) < 100_000:  # bounded: prompts are user text
            self._bpe_cache[word] = ids
        return ids

    def _id_of_piece(self, piece: str) -> int:
        i = self._ids.get(piece)
        if i is None or i >= self.first_special:
            # Every single byte is in the vocabulary, so this means broken files.
            raise TokenizerError(f"BPE produced {piece!r}, which is not a text token")
        return i


@functools.cache
def load_tokenizer(directory: str, multilingual: bool | None = None) -> WhisperTokenizer:
    """A cached :meth:`WhisperTokenizer.from_dir` (one tokenizer per model directory).

    Args:
        directory: the model directory, as a string (cache key).
        multilingual: see :meth:`WhisperTokenizer.__init__`.

    Returns:
        The shared tokenizer; treat it as read-only.
    """
    return WhisperTokenizer.from_dir(Path(directory), multilingual=multilingual)
