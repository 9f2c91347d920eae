"""CLIP byte-level BPE tokenizer, token-for-token identical to open_clip's SimpleTokenizer.

BioCLIP's text tower was trained on these exact ids, so any difference in cleaning,
splitting or merging would silently change every text embedding. The merge table is
OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT licence, see LICENSE_CLIP_VOCAB.txt).

Pipeline per text: ftfy repair, HTML unescape (twice), whitespace collapse, lower-case,
split into words with a regex, map each word's UTF-8 bytes to printable characters,
apply BPE merges, look up ids. Rows are `<start_of_text> ids <end_of_text>`, cut to the
context length with `<end_of_text>` kept last, zero padded.
"""

from __future__ import annotations

import functools
import gzip
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"

# CLIP uses the first 49152 - 256 - 2 merges of the file (line 0 is a version header),
# which gives 256 byte symbols + 256 end-of-word byte symbols + merges + 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
_WORD_CACHE_SIZE = 1 << 18
_TEXT_CACHE_SIZE = 1 << 16

# Printable ASCII without '&': ftfy and html.unescape leave such text unchanged, so it
# can skip them (ftfy costs ~40 us per caption, more than everything else together).
_PLAIN_ASCII = regex.compile(r"[\x20-\x25\x27-\x7e]*")

# Special tokens first, then English contractions, letter runs, single digits and
# runs of other non-space symbols. IGNORECASE matters for a few characters whose
# lower-case form still case-folds (e.g. "'ſ" matches "'s").
_WORD_PATTERN = regex.compile(
    "|".join(regex.escape(t) for t in (START_OF_TEXT, END_OF_TEXT))
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.cache
def byte_to_symbol() -> dict[int, str]:
    """Maps each byte to a printable character, so BPE never sees spaces or controls.

    Printable Latin-1 bytes keep their own character; the other 68 bytes are sent to
    code points 256, 257, ... in byte order (the GPT-2/CLIP convention).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    spare = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(spare)
            spare += 1
    return mapping


def clean_text(text: str) -> str:
    """Repairs mojibake, unescapes HTML, collapses whitespace and lower-cases (open_clip 'lower')."""
    if not _PLAIN_ASCII.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the BPE merge file {path}: {e}") from e
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if len(merges) != _NUM_MERGES or bad is not None:
        where = f"line {bad + 2}" if bad is not None else f"only {len(merges)} merges"
        raise ValueError(f"BPE merge file {path} is malformed ({where}); expected {_NUM_MERGES} 'a b' lines")
    return merges


class Tokenizer:
    """Callable text -> int32 token array, identical to open_clip's SimpleTokenizer.

    Word and whole-text results are memoised: taxonomic captions repeat across
    millions of images and share most of their words.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, vocab_path: str | Path | None = None):
        self.context_length = _check_context_length(context_length)
        self._vocab_path = Path(vocab_path) if vocab_path is not None else VOCAB_PATH
        merges = _read_merges(self._vocab_path)
        byte_symbols = list(byte_to_symbol().values())
        symbols = [
            *byte_symbols,
            *(s + _END_OF_WORD for s in byte_symbols),
            *(a + b for a, b in merges),
            START_OF_TEXT,
            END_OF_TEXT,
        ]
        self._symbol_to_id = {s: i for i, s in enumerate(symbols)}
        self._id_to_symbol = {i: s for s, i in self._symbol_to_id.items()}
        self._merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self._symbol_to_byte = {s: b for b, s in byte_to_symbol().items()}
        self.sot_token_id = self._symbol_to_id[START_OF_TEXT]
        self.eot_token_id = self._symbol_to_id[END_OF_TEXT]
        self._special_ids = {START_OF_TEXT: (self.sot_token_id,), END_OF_TEXT: (self.eot_token_id,)}
        # Per-instance caches (a class-level lru_cache would keep every instance alive).
        self._word_ids = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(self._compute_word_ids)
        self._text_ids = functools.lru_cache(maxsize=_TEXT_CACHE_SIZE)(self._compute_text_ids)

    @property
    def vocab_size(self) -> int:
        return len(self._symbol_to_id)

    def __reduce__(self):
        # Bound-method caches do not pickle; workers rebuild from the vocab file instead.
        return (type(self), (self.context_length, self._vocab_path))

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length}, vocab_size={self.vocab_size})"

    def _merge(self, symbols: list[str]) -> list[str]:
        """Applies BPE: repeatedly merge every occurrence of the best-ranked adjacent pair."""
        ranks = self._merge_rank
        while len(symbols) > 1:
            best_rank, best_pair = math.inf, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair, math.inf)
                if rank < best_rank:
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            first, second = best_pair
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _compute_word_ids(self, word: str) -> tuple[int, ...]:
        special = self._special_ids.get(word)
        if special is not None:
            return special
        to_symbol = byte_to_symbol()
        symbols = [to_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += _END_OF_WORD
        return tuple(self._symbol_to_id[s] for s in self._merge(symbols))

    def _compute_text_ids(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return list(self._text_ids(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token id sequence, as open_clip decodes it.

        Word ends become spaces (so the result usually ends with one) and special or
        padding ids are kept as text: drop them first if they are not wanted.
        """
        pieces = []
        for position, token in enumerate(ids):
            symbol = self._id_to_symbol.get(int(token))
            if symbol is None:
                raise ValueError(
                    f"token id {int(token)} at position {position} is outside the vocabulary [0, {self.vocab_size})"
                )
            pieces.append(symbol)
        joined = "".join(pieces)
        raw = bytearray(self._symbol_to_byte[c] for c in joined)
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Tokenises texts into an int32 array [len(texts), context_length]."""
        length = self.context_length if context_length is None else _check_context_length(context_length)
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence) and not isinstance(texts, np.ndarray):
            raise TypeError(f"Tokenizer expects a str or a sequence of str, got {type(texts).__name__}")
        result = np.zeros((len(texts), length), dtype=np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
            body = self._text_ids(text)[: length - 2]
            result[row, 0] = self.sot_token_id
            result[row, 1 : 1 + len(body)] = body
            result[row, 1 + len(body)] = self.eot_token_id
        return result


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}")
    return int(context_length)


def get_tokenizer(model_name: str = "ViT-B-16", context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """Tokenizer for a model name; every CLIP ViT (and BioCLIP 1/2) shares the same one.

    The name is accepted for open_clip-style call sites; instances are shared per context length.
    """
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str, got {type(model_name).__name__}")
    return _shared_tokenizer(_check_context_length(context_length))


@functools.lru_cache(maxsize=8)
def _shared_tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length)
