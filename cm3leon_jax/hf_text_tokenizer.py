"""The text side of the vocabulary from a Hugging Face `tokenizer.json` (the `tokenizers` library):
what an imported Chameleon/OPT checkpoint was trained with.

Why not SentencePiece: their tokenizers are byte-level BPEs (GPT-2 pre-tokenisation regex,
byte-to-unicode alphabet, merge ranks) that no SentencePiece model reproduces, and a vocabulary
that tokenises differently from training is a silent error. So `HFTextTokenizer` runs the
checkpoint's own tokenizer.json behind the interface `vocab.Vocabulary` uses of
`text_tokenizer.TextTokenizer` (vocab_size, piece_to_id, id_to_piece, is_unknown, is_control,
encode, decode, sha256), and a Vocabulary built on it saves and loads like any other.

Pieces: our text ids are contiguous (vocab.py), HF's are scattered among specials and image
tokens, so `text_ids[p]` is the HF id of our piece p (`hf_interop.vocab_mapping`'s
`ours_to_hf[text_offset:image_offset]`).

Encoding adds no special tokens and spells special added tokens found in text ("</s>" in a
caption) as ordinary text, as the SentencePiece side does with its user symbols (our own
specials are cut out by the Vocabulary before). `encode` checks that the ids decode back to the
text and stay inside `text_ids`, so a lossy tokenizer (a normaliser, <unk>) is a ValueError for
that text, never a silent change. Special added tokens and <unk> are control/unknown pieces: the
Vocabulary reserves them (never emitted, rejected on decode).

Saved as DIR/tokenizer.json (the HF file, byte for byte) + DIR/hf_text_ids.json; `sha256` covers
both. `tokenizers` (the interop extra) is imported only when one is built.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

from cm3leon_jax import text_tokenizer, workdir_io

KIND = "hf-tokenizer-json"
TOKENIZER_JSON = "tokenizer.json"
TEXT_IDS_JSON = "hf_text_ids.json"
_FORMAT = "cm3leon_jax.hf_text_ids/1"


def _tokenizers():
    from cm3leon_jax.hf_interop import interop_import
    return interop_import("tokenizers")


class HFTextTokenizer:
    """A tokenizer.json restricted to the HF ids `text_ids` (our pieces 0..len-1, in order)."""

    kind = KIND

    def __init__(self, tokenizer_json: str | os.PathLike | bytes, text_ids: Sequence[int]):
        if isinstance(tokenizer_json, (bytes, bytearray)):
            data, where = bytes(tokenizer_json), "tokenizer.json"
        else:
            where = os.fspath(tokenizer_json)
            with open(where, "rb") as f:
                data = f.read()
        try:
            spec = json.loads(data)
            self._tk = _tokenizers().Tokenizer.from_str(data.decode("utf-8"))
        except ImportError:
            raise
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{where}: not a valid Hugging Face tokenizer.json ({e})") from None
        self._tk.encode_special_tokens = True
        self._json = data
        self._text_ids = [int(i) for i in text_ids]
        if not self._text_ids:
            raise ValueError("text_ids is empty")
        hf_size = self._tk.get_vocab_size(with_added_tokens=True)
        # an id outside [0, 2**32) (a hand-edited hf_text_ids.json) was tokenizers' OverflowError
        names = [self._tk.id_to_token(i) if 0 <= i < 2 ** 32 else None for i in self._text_ids]
        missing = [i for i, n in zip(self._text_ids, names) if n is None]
        if missing:
            raise ValueError(f"{where}: text ids {missing[:8]} name no token (the tokenizer has {hf_size}); "
                             "is this the checkpoint's tokenizer?")
        if len(set(self._text_ids)) != len(self._text_ids):
            raise ValueError("text_ids repeats an id")
        self._names = names
        self._local = {hf: p for p, hf in enumerate(self._text_ids)}
        self._by_name = {n: p for p, n in enumerate(names)}
        added = self._tk.get_added_tokens_decoder()
        self._control = {self._local[i] for i, tok in added.items() if tok.special and i in self._local}
        unk = (spec.get("model") or {}).get("unk_token")
        self._unk = self._by_name.get(unk) if unk is not None else None
        self._sha = hashlib.sha256(data + b"\0" + json.dumps(self._text_ids).encode()).hexdigest()

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTextTokenizer":
        path = workdir_io.join(directory, TEXT_IDS_JSON)
        meta = workdir_io.read_format_json(path, _FORMAT, what="Hugging Face text-id map")
        return cls(workdir_io.read_bytes(workdir_io.join(directory, TOKENIZER_JSON)), meta["text_ids"])

    def files(self) -> dict[str, bytes]:
        """File name -> bytes, what `load` reads back from a directory."""
        ids = json.dumps({"format": _FORMAT, "text_ids": self._text_ids}).encode()
        return {TOKENIZER_JSON: self._json, TEXT_IDS_JSON: ids}

    def hf_vocab(self) -> dict[str, int]:
        """{token: HF id} of the whole tokenizer (added tokens included), to check it against a
        checkpoint's vocabulary."""
        return self._tk.get_vocab(with_added_tokens=True)

    @property
    def text_ids(self) -> list[int]:
        return list(self._text_ids)

    @property
    def vocab_size(self) -> int:
        return len(self._text_ids)

    @property
    def sha256(self) -> str:
        return self._sha

    @property
    def unk_id(self) -> int | None:
        return self._unk

    def piece_to_id(self, piece: str) -> int:
        if piece not in self._by_name:
            raise KeyError(f"piece {piece!r} is not in the text vocabulary")
        return self._by_name[piece]

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise IndexError(f"id {i} out of range [0, {self.vocab_size})")
        return self._names[int(i)]

    def is_byte(self, i: int) -> bool:
        return False  # byte-level BPE: every piece is bytes; none is a fallback byte piece

    def is_unknown(self, i: int) -> bool:
        return int(i) == self._unk

    def is_control(self, i: int) -> bool:
        return int(i) in self._control

    def encode(self, text: str) -> list[int]:
        text_tokenizer.check_text(text)
        hf = self._tk.encode(text, add_special_tokens=False).ids
        out = []
        for i in hf:
            if i not in self._local:
                raise ValueError(f"tokenizer.json encodes {text!r} with id {i} ({self._tk.id_to_token(i)!r}), "
                                 "which is not a text piece of this vocabulary")
            out.append(self._local[i])
        back = self._tk.decode(hf, skip_special_tokens=False)
        if back != text:
            raise ValueError(f"tokenizer.json does not reproduce {text!r} (decodes to {back!r}: a normaliser or "
                             "unknown characters), so these ids would not mean this text")
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"text ids out of range [0, {self.vocab_size}): {bad[:8]}")
        return self._tk.decode([self._text_ids[i] for i in ids], skip_special_tokens=False)
