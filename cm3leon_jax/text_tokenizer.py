"""SentencePiece BPE for the text side of the CM3Leon vocabulary: training, loading, a CLI.

Settings are chosen so that `decode(encode(text)) == text` for every UTF-8 string: identity
normalisation, no dummy prefix, whitespace kept as is, and byte fallback so characters never
seen in training become byte pieces instead of <unk>. SentencePiece maps its whitespace
meta-symbol U+2581 back to a space on decode; `TextTokenizer.encode` writes a literal U+2581 as
its three UTF-8 byte pieces so it round-trips too. Special tokens (<break>, <eos>, ...) are
user-defined symbols: always one piece, never split or merged. Training is single-threaded
with no sampling, so the same corpus gives the same model bytes.

CLI:
  python -m cm3leon_jax.text_tokenizer --out DIR [--vocab_size N] [--corpus FILE]
trains on FILE (UTF-8, one document per line; empty and non-UTF-8 lines are skipped and counted,
a UTF-16 or UTF-32 file is refused) or, by default, on captions of the built-in shapes world's
train split, and writes DIR/spm.model.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from absl import logging

from cm3leon_jax import workdir_io

# The vocabulary's own specials; cm3leon_jax.vocab maps these pieces to its reserved ids.
DEFAULT_SPECIAL_TOKENS = ("<pad>", "<eos>", "<break>", "<eoss>", "<mask>")

_META = "\u2581"  # SentencePiece's whitespace symbol.
_MAX_SENTENCE_BYTES = 1 << 20  # longer training texts are left out (counted: SentencePiece would drop them silently)


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                        character_coverage: float = 1.0) -> str:
    """Trains a lossless, deterministic BPE model; returns the path of `{model_prefix}.model`.

    `vocab_size` is an upper bound (SentencePiece's soft limit): a tiny corpus yields fewer
    pieces instead of an error, which keeps small experiments and tests working.
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"duplicate special tokens: {special_tokens}")
    for tok in special_tokens:
        if not tok or any(ch.isspace() for ch in tok) or _META in tok:
            raise ValueError(f"special token {tok!r} must be non-empty without whitespace")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")

    used, invalid, too_long = [0], [], [0]

    def sentences() -> Iterator[str]:
        for t in texts:
            if isinstance(t, str) and len(t) > _MAX_SENTENCE_BYTES // 4 and \
                    len(t.encode("utf-8", "surrogatepass")) > _MAX_SENTENCE_BYTES:
                too_long[0] += 1   # SentencePiece drops these without a word
                continue
            if t:  # SentencePiece has no use for empty sentences.
                if isinstance(t, str):
                    try:   # a lone surrogate was pybind11's "Unable to cast Python instance" RuntimeError
                        check_text(t)
                    except ValueError as e:
                        invalid.append(f"non-empty text #{used[0]} of the corpus (from 0): {e}")
                        return   # raised below: SentencePiece wraps what its iterator raises
                used[0] += 1
                yield t

    prefix_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(prefix_dir, exist_ok=True)
    try:
        data = _train(sentences(), vocab_size, special_tokens, character_coverage)
    except RuntimeError as e:
        if invalid:
            raise ValueError(invalid[0]) from None
        if not used[0]:
            raise ValueError("no non-empty texts to train the tokenizer on" + (
                f" ({too_long[0]} longer than {_MAX_SENTENCE_BYTES} bytes left out)" if too_long[0] else "")) from e
        # SentencePiece's INTERNAL check: the 256 byte pieces, <unk>, the specials and every
        # character of the corpus need a piece each, whatever the soft limit.
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if need:
            raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: it needs at least "
                             f"{need.group(1)} pieces (256 byte pieces, <unk>, {len(special_tokens)} special "
                             "tokens and one per distinct character)") from None
        raise
    if invalid:
        raise ValueError(invalid[0])
    if too_long[0]:
        logging.warning("%d texts longer than %d bytes were left out of the tokenizer's training (SentencePiece's "
                        "max_sentence_length); %d were used", too_long[0], _MAX_SENTENCE_BYTES, used[0])
    path = f"{model_prefix}.model"
    with open(path, "wb") as f:
        f.write(data)
    sp = spm.SentencePieceProcessor(model_proto=data)
    with open(f"{model_prefix}.vocab", "w", encoding="utf-8") as f:  # for humans only
        for i in range(sp.get_piece_size()):  # JSON-quoted: pieces may hold tabs or newlines
            f.write(f"{json.dumps(sp.id_to_piece(i), ensure_ascii=False)}\t{sp.get_score(i):g}\n")
    return path


def _train(sentences, vocab_size, special_tokens, character_coverage) -> bytes:
    # Written to memory, not to model_prefix: the prefix would be stored inside the model and
    # make identical trainings in different directories differ byte for byte.
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=writer,
        vocab_size=int(vocab_size),
        hard_vocab_limit=False,
        model_type="bpe",
        user_defined_symbols=special_tokens,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        minloglevel=2,
    )
    return writer.getvalue()


def check_text(text) -> None:
    """Text every tokenizer accepts: a str that is valid Unicode (no lone surrogates)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode (lone surrogate?): {e}") from None


def _keeps_text_as_is(data: bytes) -> bool:
    """Whether a model's settings keep text exactly (train_sentencepiece's: identity normalisation,
    no dummy prefix, whitespace kept). A model from elsewhere (NFKC, collapsed spaces) would change
    text silently, so `encode` checks each text's round trip for those (and when unreadable)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto.FromString(data)
    except Exception:  # protobuf missing or too old for this model: check every text
        return False
    ns = proto.normalizer_spec
    return not (ns.precompiled_charsmap or ns.add_dummy_prefix or ns.remove_extra_whitespaces
                or proto.denormalizer_spec.precompiled_charsmap)


class TextTokenizer:
    """A loaded SentencePiece model with the lossless encode described in the module doc."""

    def __init__(self, model: str | os.PathLike | bytes):
        if isinstance(model, (bytes, bytearray)):
            data, where = bytes(model), "model bytes"
        else:
            where = os.fspath(model)
            with open(model, "rb") as f:
                data = f.read()
        self._bytes = data
        # an empty or truncated file (or spm.vocab) was SentencePiece's RuntimeError or, empty, an
        # IndexError at the first lookup
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data) if data else None
        except RuntimeError:
            self._sp = None
        if self._sp is None:
            raise ValueError(f"{where} is not a SentencePiece model ({len(data)} bytes, empty or corrupted); "
                             "train one with python -m cm3leon_jax.text_tokenizer")
        self._exact = _keeps_text_as_is(data)
        self._meta_bytes = None
        pieces = [f"<0x{b:02X}>" for b in _META.encode("utf-8")]
        ids = [self._sp.piece_to_id(p) for p in pieces]
        if all(self._sp.id_to_piece(i) == p for i, p in zip(ids, pieces)):
            self._meta_bytes = ids

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_bytes(self) -> bytes:
        """Serialized model, to save beside a checkpoint."""
        return self._bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._bytes).hexdigest()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def piece_to_id(self, piece: str) -> int:
        """Id of an exact piece; KeyError rather than SentencePiece's silent <unk>."""
        i = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(i) != piece:
            raise KeyError(f"piece {piece!r} is not in the vocabulary")
        return i

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise IndexError(f"id {i} out of range [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(i))

    def is_byte(self, i: int) -> bool:
        return bool(self._sp.is_byte(int(i)))

    def is_unknown(self, i: int) -> bool:
        return bool(self._sp.is_unknown(int(i)))

    def is_control(self, i: int) -> bool:
        return bool(self._sp.is_control(int(i)))

    def encode(self, text: str) -> list[int]:
        check_text(text)
        if _META not in text:
            ids = list(self._sp.encode(text))
        elif self._meta_bytes is None:
            raise ValueError("text contains U+2581 and this model has no byte pieces to spell it")
        else:
            ids = []
            for k, chunk in enumerate(text.split(_META)):
                if k:
                    ids.extend(self._meta_bytes)
                if chunk:
                    ids.extend(self._sp.encode(chunk))
        if not self._exact and (back := self._sp.decode(ids)) != text:
            raise ValueError(f"this SentencePiece model does not reproduce {text!r} (decodes to {back!r}: it "
                             "normalises text or drops whitespace), so these ids would not mean this text; train a "
                             "lossless one with python -m cm3leon_jax.text_tokenizer")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"text ids out of range [0, {n}): {bad[:8]}")
        return self._sp.decode(ids)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            f.write(self._bytes)


# ----------------------------------------------------------------------------- corpus + CLI


@dataclasses.dataclass
class CorpusStats:
    """Counts of what a corpus file held; skipped lines are reported, never fatal."""

    documents: int = 0
    empty: int = 0
    invalid_utf8: int = 0


def read_corpus(path: str | os.PathLike, stats: CorpusStats) -> Iterator[str]:
    """Yields one document per line; blank and undecodable lines only bump the counters. A UTF-16
    or UTF-32 file (a byte-order mark) is refused up front: its ASCII is valid UTF-8 with a NUL
    after each character, so it trained silently on that; a UTF-8 mark is dropped."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "UTF-32" if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) else "UTF-16"
        raise ValueError(f"corpus {path} is {encoding} (byte-order mark {head[:2 if encoding == 'UTF-16' else 4]!r}); "
                         f"it must be UTF-8: convert it, e.g. iconv -f {encoding} -t UTF-8")
    return _corpus_lines(path, stats)


def _corpus_lines(path, stats: CorpusStats) -> Iterator[str]:
    with open(path, "rb") as f:
        for k, raw in enumerate(f):
            if k == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if raw.endswith(b"\n"):
                raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.invalid_utf8 += 1
                continue
            if not line.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            yield line


def shapes_captions(n: int, seed: int = 0) -> Iterator[str]:
    """Captions of the built-in dataset's train split: the default tokenizer corpus."""
    from data_pipeline import shapes_world

    config = shapes_world.ShapesWorldConfig(seed=seed)
    for i in range(n):
        yield shapes_world.scene_and_caption("train", i, config)[1]


def _main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    out = workdir_io.require_local(FLAGS.out, "--out")   # (absolute, `~` expanded)
    os.makedirs(out, exist_ok=True)
    prefix = os.path.join(out, "spm")
    stats = CorpusStats()
    if FLAGS.corpus:
        texts = read_corpus(FLAGS.corpus, stats)
        source = FLAGS.corpus
    else:
        def counted():
            for t in shapes_captions(FLAGS.num_captions, FLAGS.seed):
                stats.documents += 1
                yield t
        texts = counted()
        source = f"shapes world train captions (seed {FLAGS.seed})"
    path = train_sentencepiece(texts, prefix, FLAGS.vocab_size)
    tok = TextTokenizer(path)
    print(f"corpus: {source}")
    print(f"documents used: {stats.documents}; skipped empty lines: {stats.empty}; "
          f"skipped invalid UTF-8 lines: {stats.invalid_utf8}")
    print(f"model: {path} ({len(tok.model_bytes)} bytes, sha256 {tok.sha256[:16]}...)")
    print(f"vocab size: {tok.vocab_size} (requested {FLAGS.vocab_size})")
    sample = "a small red circle at the top left <break>"
    ids = tok.encode(sample)
    print(f"example: {sample!r} -> {len(ids)} pieces {[tok.id_to_piece(i) for i in ids]}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "Directory to write spm.model (and spm.vocab) into.")
    flags.DEFINE_integer("vocab_size", 1024, "Upper bound on the number of pieces.")
    flags.DEFINE_string("corpus", None, "Text file, one document per line. Default: shapes captions.")
    flags.DEFINE_integer("num_captions", 20000, "Shapes-world captions to train on without --corpus.")
    flags.DEFINE_integer("seed", 0, "Shapes-world seed for the default corpus.")
    flags.mark_flag_as_required("out")
    app.run(_main)
