"""SentencePiece BPE: lossless round trips, whole special tokens, the CLI and bad corpora."""

import subprocess
import sys

import pytest

from cm3leon_jax import text_tokenizer as tt
from tests.helpers import REPO, cli_env

TEXTS = [
    "a small red circle at the top left",
    "",
    " leading space",
    "trailing spaces  ",
    "multiple   inner    spaces",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld, naïve café",
    "日本語のテキスト 漢字",
    "emoji 🙂🚀 and zero-width\u200bjoiner",
    "literal \u2581 meta symbol \u2581\u2581",
    "\u2581leading meta",
    "nul \x00 and control \x07 chars",
    "zyzzyva quixotic QWERTY 1234567890",
    "<break> <eos><mask> <eoss><pad>",
    "almost special: <break <mask:3> <eos >",
]


@pytest.fixture(scope="module")
def tok(tiny_spm_model):
    return tt.TextTokenizer(tiny_spm_model)


def test_round_trips_arbitrary_text(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text)


def test_unseen_characters_fall_back_to_bytes(tok):
    ids = tok.encode("漢")
    assert len(ids) == 3 and all(tok.is_byte(i) for i in ids)
    assert not any(tok.is_unknown(i) for t in TEXTS for i in tok.encode(t))


def test_special_tokens_are_single_unsplit_ids(tok):
    for special in tt.DEFAULT_SPECIAL_TOKENS:
        sid = tok.piece_to_id(special)
        assert tok.encode(special) == [sid]
        ids = tok.encode(f"red{special}circle {special} x")
        assert ids.count(sid) == 2
    with pytest.raises(KeyError):
        tok.piece_to_id("<not-a-piece>")


def test_training_is_deterministic_and_bytes_reload(tmp_path, tok):
    texts = list(tt.shapes_captions(300, seed=3))
    a = tt.train_sentencepiece(texts, str(tmp_path / "a"), 330)
    b = tt.train_sentencepiece(iter(texts), str(tmp_path / "b"), 330)
    assert open(a, "rb").read() == open(b, "rb").read()
    again = tt.TextTokenizer(tok.model_bytes)
    assert again.sha256 == tok.sha256 and again.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    with pytest.raises(ValueError):
        tt.train_sentencepiece(["", ""], str(tmp_path / "c"), 330)


def test_a_vocab_size_below_the_byte_pieces_and_characters_is_a_clear_error(tmp_path):
    """Was SentencePiece's RuntimeError 'INTERNAL: ... required_chars' from deep inside training."""
    texts = ["hello world", "foo bar"]   # 11 characters + 256 bytes + <unk> + 5 specials
    with pytest.raises(ValueError, match=r"vocab_size=272 is too small.*at least 273"):
        tt.train_sentencepiece(texts, str(tmp_path / "s"), 272)
    assert tt.TextTokenizer(tt.train_sentencepiece(texts, str(tmp_path / "s"), 273)).vocab_size == 273


def test_texts_over_sentencepieces_length_limit_are_counted_not_dropped_silently(tmp_path, caplog):
    """SentencePiece drops a text over max_sentence_length (1 MiB) without a word, while the CLI
    reported it as used."""
    long_text = "abcdefgh " * (tt._MAX_SENTENCE_BYTES // 9 + 1)
    with caplog.at_level("WARNING"):
        tt.train_sentencepiece([long_text, "short"], str(tmp_path / "s"), 300)
    assert "1 texts longer than 1048576 bytes were left out" in caplog.text and "1 were used" in caplog.text
    with pytest.raises(ValueError, match="1 longer than 1048576 bytes left out"):
        tt.train_sentencepiece([long_text], str(tmp_path / "t"), 300)


def test_a_training_text_with_a_lone_surrogate_is_named(tmp_path):
    """Was pybind11's 'Unable to cast Python instance of type str' RuntimeError from SentencePiece
    (text decoded with errors='surrogateescape')."""
    with pytest.raises(ValueError, match=r"text #1 .*lone surrogate"):
        tt.train_sentencepiece(["fine", "", "bad \udcff byte"], str(tmp_path / "s"), 300)


def test_corpus_reader_skips_and_counts_bad_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"hello world\n\n   \n\xff\xfe bad\nvalid line two\r\n\xc3\x28\nlast")
    stats = tt.CorpusStats()
    docs = list(tt.read_corpus(path, stats))
    assert docs == ["hello world", "valid line two", "last"]
    assert (stats.documents, stats.empty, stats.invalid_utf8) == (3, 2, 2)


def test_a_utf16_corpus_is_refused_and_a_utf8_mark_dropped(tmp_path):
    """A UTF-16 file (what Windows PowerShell's `>` writes) is ASCII with a NUL after each
    character, valid UTF-8: it trained silently on that (only its first line was skipped)."""
    path = tmp_path / "corpus.txt"
    for encoding, name in (("utf-16", "UTF-16"), ("utf-32", "UTF-32")):
        path.write_bytes("a red circle\na blue star\n".encode(encoding))
        with pytest.raises(ValueError, match=f"is {name} .*must be UTF-8"):
            tt.read_corpus(path, tt.CorpusStats())
    path.write_bytes("a red circle\na blue star\n".encode("utf-8-sig"))
    assert list(tt.read_corpus(path, tt.CorpusStats())) == ["a red circle", "a blue star"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cm3leon_jax.text_tokenizer", *args],
                          cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=60)


def test_cli_trains_on_a_corpus_file_with_bad_lines(tmp_path):
    corpus = tmp_path / "corpus.txt"
    good = [f"document number {i} about shapes and colours" for i in range(50)]
    corpus.write_bytes("\n".join(good).encode() + b"\n\n\xff\xfe\n\n\x80abc\n")
    out = tmp_path / "out"
    r = _cli("--out", str(out), "--vocab_size", "320", "--corpus", str(corpus))
    assert r.returncode == 0, r.stderr
    assert "documents used: 50; skipped empty lines: 2; skipped invalid UTF-8 lines: 2" in r.stdout
    tok = tt.TextTokenizer(out / "spm.model")
    assert tok.decode(tok.encode(good[7])) == good[7]


def test_cli_defaults_to_shapes_captions(tmp_path):
    r = _cli("--out", str(tmp_path), "--vocab_size", "350", "--num_captions", "300")
    assert r.returncode == 0, r.stderr
    assert "shapes world" in r.stdout and "documents used: 300" in r.stdout
    tok = tt.TextTokenizer(tmp_path / "spm.model")
    assert 300 < tok.vocab_size <= 350
    # BPE learned caption words: a common caption is far shorter than its characters.
    caption = "a small red circle at the top left"
    assert len(tok.encode(caption)) < len(caption) // 2


def test_a_model_that_normalises_text_refuses_what_it_would_change():
    """A SentencePiece model from elsewhere (SentencePiece's defaults: NFKC, collapsed spaces, a
    dummy prefix) changed text silently through the vocabulary: "a  b" came back as "a b"."""
    import io

    import sentencepiece as spm
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tt.shapes_captions(300)), model_writer=writer,
                                   vocab_size=60, minloglevel=2, num_threads=1)
    tok = tt.TextTokenizer(writer.getvalue())
    assert tok.decode(tok.encode("a red circle")) == "a red circle"
    for text in ("a  red   circle", "tab\there", "\uff46ull width", " lead"):
        with pytest.raises(ValueError, match="does not reproduce"):
            tok.encode(text)


def test_an_empty_or_corrupted_model_file_is_a_clear_error(tmp_path, tiny_spm_model):
    """A truncated spm.model (or spm.vocab given as the model) was SentencePiece's RuntimeError, an
    empty one an IndexError at the first lookup."""
    data = open(tiny_spm_model, "rb").read()
    vocab_file = tiny_spm_model[:-len(".model")] + ".vocab"
    for bad in (b"", data[:len(data) // 2]):
        with pytest.raises(ValueError, match="is not a SentencePiece model"):
            tt.TextTokenizer(bad)
    with pytest.raises(ValueError, match=r"spm\.vocab is not a SentencePiece model"):
        tt.TextTokenizer(vocab_file)
