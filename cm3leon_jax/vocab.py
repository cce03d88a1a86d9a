"""One id space for text and images, and the CM3Leon document layout on top of it.

Id layout (contiguous, in this order; `size` is the total):
  0 <pad>, 1 <eos>, 2 <break>, 3 <eoss>, 4 <mask>     (<mask> = null condition for CFG)
  5 .. 5+S-1                <mask:0> .. <mask:S-1>     CM3 sentinels (S = num_sentinels)
  text_offset ..            SentencePiece piece p  ->  text_offset + p
  image_offset ..           image code c           ->  image_offset + c
Special ids come first so they stay fixed whatever tokenizer or codebook is plugged in.

Special strings inside text ("<eos>", "<mask:3>", ...) always become the special ids: encode_text
finds them with a regex before SentencePiece sees the text, so they are never split; a tokenizer
trained with them as user-defined symbols is also mapped (its own ids for them are reserved and
never emitted). SentencePiece's <unk> and control pieces are reserved likewise.

Document layout rule (CM3Leon: one caption-image document is `caption <break> image <break>`):
  * a text part is its text tokens;
  * an image part is its codes followed by <break>, and preceded by <break> when the part
    before it is text.
So <break> marks every switch of modality and closes every image. A document is a list of parts,
each a non-empty str without "<break>" or an image (N = image_tokens_per_image codes, flat or as
the (h, w) grid); two text parts may not be adjacent (they would merge). Under these rules
`decode_document(encode_document(parts)) == parts` exactly, and decode_document rejects any
token stream the rule cannot produce (image spans of the wrong length, stray <break>s, ...).
Other specials (<eos>, <mask:i>, <eoss>, <pad>) count as text, so retrieval-augmented and
CM3-masked sequences decode as long as no masked span cuts into an image.

A Vocabulary saves as DIR/vocab.json (layout + sha256 of the SentencePiece model) and
DIR/spm.model beside a checkpoint; loading verifies both so a model is never paired with the
wrong vocabulary. The text side may instead be a Hugging Face tokenizer.json
(`hf_text_tokenizer.HFTextTokenizer`, for imported checkpoints): then DIR holds its files and
vocab.json names it (`text_tokenizer`, `hf_tokenizer_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from cm3leon_jax import hf_text_tokenizer, workdir_io
from cm3leon_jax.text_tokenizer import TextTokenizer

PAD_ID, EOS_ID, BREAK_ID, EOSS_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ("<pad>", "<eos>", "<break>", "<eoss>", "<mask>")
NUM_BASE_SPECIALS = len(SPECIAL_TOKENS)
SENTINEL_OFFSET = NUM_BASE_SPECIALS

VOCAB_JSON = "vocab.json"
SPM_MODEL = "spm.model"
FORMAT = "cm3leon_jax.vocab/1"

# Canonical spellings only ("<mask:03>" stays plain text), so decode(encode(text)) is exact.
SPECIAL_PATTERN = re.compile(r"<pad>|<eos>|<eoss>|<break>|<mask>|<mask:(0|[1-9][0-9]*)>")


def sentinel_token(i: int) -> str:
    return f"<mask:{i}>"


def stored_text(text: str) -> tuple[str, str | None]:
    """(text as ingestion stores a caption, None), or with the reason it skips such a caption (and a
    prompt is refused). Stored: byte-order marks dropped, every whitespace run one space, so prompts
    encode to pieces training saw (a newline or a double space encodes to others). Reasons:
    empty_caption; caption_has_nul (a zero-filled file, UTF-16 read as UTF-8);
    caption_has_special_tokens (training text never holds one, and `encode_text` would make it that
    control token). One rule for ingestion, prompts files and prompts."""
    text = " ".join(text.replace("\ufeff", "").split())
    reason = ("empty_caption" if not text else "caption_has_nul" if "\x00" in text else
              "caption_has_special_tokens" if SPECIAL_PATTERN.search(text) else None)
    return text, reason


_PROMPT_PROBLEMS = {"caption_has_nul": "holds a NUL byte",
                    "caption_has_special_tokens": "spells a special token, which training text never holds"}


def prompt_text(text, what: str) -> str:
    """A prompt's text as stored, or a ValueError for what `stored_text` would skip."""
    text, reason = stored_text(str(text))
    if reason == "empty_caption":
        raise ValueError(f"{what} is empty")
    if reason:
        raise ValueError(f"{what} {text[:80]!r} {_PROMPT_PROBLEMS[reason]}")
    return text


class Vocabulary:
    """The id layout and document codec; immutable after construction."""

    def __init__(self, text_tokenizer: TextTokenizer, num_image_codes: int,
                 image_tokens_per_image: int, num_sentinels: int = 16,
                 image_grid: tuple[int, int] | None = None):
        if num_image_codes < 1:
            raise ValueError(f"num_image_codes must be >= 1, got {num_image_codes}")
        if image_tokens_per_image < 1:
            raise ValueError(f"image_tokens_per_image must be >= 1, got {image_tokens_per_image}")
        if num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
        n = int(image_tokens_per_image)
        if image_grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"image_tokens_per_image={n} is not a square; pass image_grid=(h, w)")
            image_grid = (side, side)
        image_grid = (int(image_grid[0]), int(image_grid[1]))
        if image_grid[0] * image_grid[1] != n:
            raise ValueError(f"image_grid {image_grid} does not hold {n} tokens")
        self._tok = text_tokenizer
        self._num_image_codes = int(num_image_codes)
        self._n = n
        self._grid = image_grid
        self._num_sentinels = int(num_sentinels)
        text_size = text_tokenizer.vocab_size
        # SentencePiece's own ids for our specials map to ours; those ids plus <unk> and control
        # pieces are reserved: encode never emits them and decode rejects them.
        self._sp_special = {}
        reserved = np.zeros(text_size, dtype=bool)
        for our_id, tok in enumerate(SPECIAL_TOKENS):
            try:
                sp_id = text_tokenizer.piece_to_id(tok)
            except KeyError:
                continue
            self._sp_special[sp_id] = our_id
            reserved[sp_id] = True
        for i in range(text_size):
            if text_tokenizer.is_unknown(i) or text_tokenizer.is_control(i):
                reserved[i] = True
        self._reserved = reserved

    # ------------------------------------------------------------------ layout

    @property
    def text_tokenizer(self) -> TextTokenizer:
        return self._tok

    @property
    def num_sentinels(self) -> int:
        return self._num_sentinels

    @property
    def num_specials(self) -> int:
        return NUM_BASE_SPECIALS + self._num_sentinels

    @property
    def text_offset(self) -> int:
        return self.num_specials

    @property
    def text_size(self) -> int:
        return len(self._reserved)

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.text_size

    @property
    def num_image_codes(self) -> int:
        return self._num_image_codes

    @property
    def image_tokens_per_image(self) -> int:
        return self._n

    @property
    def image_grid(self) -> tuple[int, int]:
        return self._grid

    @property
    def size(self) -> int:
        return self.image_offset + self._num_image_codes

    def padded_size(self, multiple: int = 128) -> int:
        """Embedding-table size rounded up for fast matmuls; ids >= size stay invalid."""
        return -(-self.size // multiple) * multiple

    pad_id, eos_id, break_id, eoss_id, mask_id = PAD_ID, EOS_ID, BREAK_ID, EOSS_ID, MASK_ID

    def sentinel(self, i: int) -> int:
        if not 0 <= int(i) < self._num_sentinels:
            raise ValueError(f"sentinel {i} out of range [0, {self._num_sentinels})")
        return SENTINEL_OFFSET + int(i)

    def is_special(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= 0) & (ids < self.text_offset)

    def is_sentinel(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= SENTINEL_OFFSET) & (ids < self.text_offset)

    def is_text(self, ids) -> np.ndarray:
        """True on SentencePiece-range ids (reserved pieces included; specials excluded)."""
        ids = np.asarray(ids)
        return (ids >= self.text_offset) & (ids < self.image_offset)

    def emittable_text_ranges(self) -> tuple[tuple[int, int], ...]:
        """[low, high) id ranges of the text pieces a decoder may draw: the SentencePiece range
        without its reserved pieces (which `decode_text` rejects)."""
        ok = np.concatenate([[False], ~self._reserved, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(ok))
        return tuple((self.text_offset + int(a), self.text_offset + int(b)) for a, b in zip(edges[::2], edges[1::2]))

    def is_image(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.image_offset) & (ids < self.size)

    def token_string(self, i: int) -> str:
        """Readable name of any id, for debugging and logs."""
        i = int(i)
        if 0 <= i < NUM_BASE_SPECIALS:
            return SPECIAL_TOKENS[i]
        if self.is_sentinel(i):
            return sentinel_token(i - SENTINEL_OFFSET)
        if self.is_text(i):
            return self._tok.id_to_piece(i - self.text_offset)
        if self.is_image(i):
            return f"<img:{i - self.image_offset}>"
        raise ValueError(f"unknown id {i}; vocabulary size is {self.size}")

    # ------------------------------------------------------------------ images

    def image_codes_to_ids(self, codes) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iu":
            raise ValueError(f"image codes must be integers, got dtype {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= self._num_image_codes):
            raise ValueError(f"image codes out of range [0, {self._num_image_codes}): "
                             f"min {codes.min()}, max {codes.max()}")
        return (codes.astype(np.int64) + self.image_offset).astype(np.int32)

    def ids_to_image_codes(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and not self.is_image(ids).all():
            bad = ids[~self.is_image(ids)]
            raise ValueError(f"ids are not image tokens: {bad[:8].tolist()}")
        return (ids.astype(np.int64) - self.image_offset).astype(np.int32)

    # ------------------------------------------------------------------ text

    def encode_text(self, text: str) -> np.ndarray:
        """Text to ids; special strings become special ids, the rest SentencePiece pieces."""
        if not isinstance(text, str):
            raise ValueError(f"text must be str, got {type(text).__name__}")
        out: list[int] = []
        pos = 0
        for m in SPECIAL_PATTERN.finditer(text):
            if m.group(1) is not None and int(m.group(1)) >= self._num_sentinels:
                continue  # not one of our sentinels: plain text.
            out.extend(self._encode_plain(text[pos:m.start()]))
            if m.group(1) is not None:
                out.append(self.sentinel(int(m.group(1))))
            else:
                out.append(SPECIAL_TOKENS.index(m.group(0)))
            pos = m.end()
        out.extend(self._encode_plain(text[pos:]))
        return np.asarray(out, dtype=np.int32)

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        out = []
        for p in self._tok.encode(text):
            if p in self._sp_special:
                out.append(self._sp_special[p])
            elif self._reserved[p]:
                raise ValueError(f"text tokenizer produced reserved piece {self._tok.id_to_piece(p)!r} "
                                 f"for {text!r}; the model needs byte_fallback to be lossless")
            else:
                out.append(self.text_offset + p)
        return out

    def decode_text(self, ids) -> str:
        """Ids of text and specials back to the exact string; images are rejected."""
        ids = np.asarray(ids).reshape(-1)
        self._check_ids(ids)
        if self.is_image(ids).any():
            raise ValueError(f"image token at position {int(np.argmax(self.is_image(ids)))} "
                             "inside text; use decode_document")
        pieces: list[str] = []
        run: list[int] = []
        for i in ids.tolist():
            if i >= self.text_offset:
                p = i - self.text_offset
                if self._reserved[p]:
                    raise ValueError(f"id {i} is the text tokenizer's reserved piece "
                                     f"{self._tok.id_to_piece(p)!r}; it never appears in encoded text")
                run.append(p)
                continue
            if run:
                pieces.append(self._tok.decode(run))
                run = []
            pieces.append(self.token_string(i))
        if run:
            pieces.append(self._tok.decode(run))
        return "".join(pieces)

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and ids.dtype.kind not in "iu":  # [] is float64 but harmless
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.size)
        if bad.any():
            raise ValueError(f"unknown ids (vocabulary size {self.size}): {ids[bad][:8].tolist()}")

    # ------------------------------------------------------------------ documents

    def _image_part(self, k: int, part) -> np.ndarray:
        arr = np.asarray(part)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"part {k}: image codes must be integers, got dtype {arr.dtype}")
        if arr.shape != (self._n,) and arr.shape != self._grid:
            raise ValueError(f"part {k}: image has shape {arr.shape} ({arr.size} codes); expected "
                             f"({self._n},) or {self._grid} = image_tokens_per_image {self._n}")
        try:
            return self.image_codes_to_ids(arr.reshape(-1))
        except ValueError as e:
            raise ValueError(f"part {k}: {e}") from None

    def encode_document(self, parts: Sequence[Any]) -> np.ndarray:
        """Parts (str text / int code images) to one int32 token array, per the layout rule."""
        if isinstance(parts, (str, bytes, np.ndarray)) or not isinstance(parts, Sequence):
            raise ValueError(f"a document is a list of parts, got {type(parts).__name__}")
        chunks: list[np.ndarray] = []
        prev = None
        for k, part in enumerate(parts):
            if isinstance(part, str):
                if not part:
                    raise ValueError(f"part {k}: empty text part (it would vanish on decode)")
                if "<break>" in part:
                    raise ValueError(f"part {k}: text contains '<break>'; breaks are structural, "
                                     "split the document into parts instead")
                if prev == "text":
                    raise ValueError(f"part {k}: two adjacent text parts would merge; join them")
                chunks.append(self.encode_text(part))
                prev = "text"
            elif isinstance(part, bytes):
                raise ValueError(f"part {k}: bytes are neither text (str) nor image codes")
            else:
                ids = self._image_part(k, part)
                if prev == "text":
                    chunks.append(np.asarray([BREAK_ID], np.int32))
                chunks.append(ids)
                chunks.append(np.asarray([BREAK_ID], np.int32))
                prev = "image"
        if not chunks:
            return np.zeros((0,), np.int32)
        return np.concatenate(chunks).astype(np.int32)

    def decode_document(self, tokens) -> list:
        """Inverse of encode_document: str text parts and (h, w) int32 code grids."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        self._check_ids(tokens)
        if tokens.size == 0:
            return []
        cls = np.where(self.is_image(tokens), 2, np.where(tokens == BREAK_ID, 1, 0))
        cuts = np.flatnonzero(np.diff(cls)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [tokens.size]])
        runs = [(int(cls[s]), int(s), int(e)) for s, e in zip(starts, ends)]
        parts: list = []
        prev = None
        k = 0
        while k < len(runs):
            c, s, e = runs[k]
            if c == 0:
                parts.append(self.decode_text(tokens[s:e]))
                prev = "text"
                k += 1
            elif c == 1:
                if e - s != 1:
                    raise ValueError(f"{e - s} consecutive <break> tokens at position {s}")
                if prev != "text":
                    raise ValueError(f"stray <break> at position {s}: only text before an image "
                                     "or the end of an image may be followed by <break>")
                if k + 1 == len(runs) or runs[k + 1][0] != 2:
                    raise ValueError(f"<break> at position {s} after text is not followed by an image")
                prev = "break"
                k += 1
            else:
                if prev == "text":
                    raise ValueError(f"image tokens at position {s} follow text without <break>")
                if e - s != self._n:
                    raise ValueError(f"image span at position {s} has {e - s} tokens; "
                                     f"expected image_tokens_per_image = {self._n}")
                if k + 1 == len(runs) or runs[k + 1][0] != 1:
                    raise ValueError(f"image at positions {s}..{e - 1} is not followed by <break>")
                bs, be = runs[k + 1][1:]
                if be - bs != 1:
                    raise ValueError(f"{be - bs} consecutive <break> tokens at position {bs}")
                parts.append(self.ids_to_image_codes(tokens[s:e]).reshape(self._grid))
                prev = "image"
                k += 2
        return parts

    # ------------------------------------------------------------------ persistence

    def layout(self) -> dict:
        """Everything that fixes the meaning of an id; equal layouts mean interchangeable vocabs."""
        return {
            "format": FORMAT,
            "special_tokens": list(SPECIAL_TOKENS),
            "num_sentinels": self._num_sentinels,
            "text_offset": self.text_offset,
            "text_size": self.text_size,
            "image_offset": self.image_offset,
            "num_image_codes": self._num_image_codes,
            "image_tokens_per_image": self._n,
            "image_grid": list(self._grid),
            "size": self.size,
            **_tokenizer_layout(self._tok),
        }

    @property
    def fingerprint(self) -> str:
        return _digest(self.layout())

    def check_compatible(self, other: "Vocabulary | dict | str") -> None:
        """Raises ValueError naming what differs; accepts a Vocabulary, a layout or a fingerprint."""
        if isinstance(other, str):
            if other != self.fingerprint:
                raise ValueError(f"vocabulary fingerprint mismatch: expected {other}, "
                                 f"this vocabulary is {self.fingerprint}")
            return
        theirs = other.layout() if isinstance(other, Vocabulary) else dict(other)
        theirs.pop("fingerprint", None)
        mine = self.layout()
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            detail = "; ".join(f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in diff)
            raise ValueError(f"incompatible vocabularies ({detail})")

    def save(self, directory: str | os.PathLike) -> None:
        """A local directory or an object-store URL (workdir_io); vocab.json last, so a directory
        holding it holds the tokenizer it names."""
        workdir_io.makedirs(directory)
        meta = dict(self.layout(), fingerprint=self.fingerprint)
        files = self._tok.files() if _is_hf(self._tok) else {SPM_MODEL: self._tok.model_bytes}
        for name, data in files.items():
            workdir_io.write_bytes(workdir_io.join(directory, name), data)
        workdir_io.write_text(workdir_io.join(directory, VOCAB_JSON), json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def saved_in(directory: str | os.PathLike) -> bool:
        """Whether `directory` (local or in a bucket) holds a saved vocabulary (`save` writes
        vocab.json last)."""
        return workdir_io.exists(workdir_io.join(directory, VOCAB_JSON))

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_fingerprint: str | None = None) -> "Vocabulary":
        """Loads and verifies a saved vocabulary; any mismatch is a ValueError, never a guess."""
        json_path = workdir_io.join(directory, VOCAB_JSON)
        spm_path = workdir_io.join(directory, SPM_MODEL)
        meta = workdir_io.read_format_json(json_path, FORMAT, what="saved vocabulary")
        stored = meta.pop("fingerprint", None)
        if stored is not None and stored != _digest(meta):
            raise ValueError(f"{json_path}: fingerprint {stored} does not match its contents "
                             f"({_digest(meta)}); the file was edited")
        if meta.get("text_tokenizer") == hf_text_tokenizer.KIND:
            tok, key = hf_text_tokenizer.HFTextTokenizer.load(directory), "hf_tokenizer_sha256"
            what = workdir_io.join(directory, hf_text_tokenizer.TOKENIZER_JSON)
        else:
            key, what = "spm_sha256", spm_path
            try:
                tok = TextTokenizer(workdir_io.read_bytes(spm_path))
            except ValueError as e:   # a truncated copy: name the file and the vocab.json it fails
                raise ValueError(f"{spm_path} does not match {json_path}: {e}") from None
        if tok.sha256 != meta[key]:
            raise ValueError(f"{what} does not match {json_path}: sha256 {tok.sha256} != "
                             f"{meta[key]} (the text tokenizer was replaced)")
        vocab = cls(tok, meta["num_image_codes"], meta["image_tokens_per_image"],
                    meta["num_sentinels"], tuple(meta["image_grid"]))
        vocab.check_compatible(meta)
        if expected_fingerprint is not None:
            vocab.check_compatible(expected_fingerprint)
        return vocab

    def __repr__(self) -> str:
        return (f"Vocabulary(size={self.size}, specials={self.num_specials}, text={self.text_size}"
                f"@{self.text_offset}, image={self._num_image_codes}@{self.image_offset}, "
                f"image_grid={self._grid})")


def _is_hf(tok) -> bool:
    return getattr(tok, "kind", None) == hf_text_tokenizer.KIND


def _tokenizer_layout(tok) -> dict:
    """The layout entries naming the text tokenizer (SentencePiece layouts keep their old keys, so
    their fingerprints do not change)."""
    if _is_hf(tok):
        return {"text_tokenizer": hf_text_tokenizer.KIND, "hf_tokenizer_sha256": tok.sha256}
    return {"spm_sha256": tok.sha256}


def _digest(layout: dict) -> str:
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()
