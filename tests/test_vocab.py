"""One vocabulary: id layout, document round trips, rejection of malformed input, save/load."""

import json
import os

import numpy as np
import pytest

from cm3leon_jax import text_tokenizer as tt
from cm3leon_jax import vocab as vb

N_CODES, N_TOK, N_SENT = 512, 16, 8


@pytest.fixture(scope="module")
def tok(tiny_spm_model):
    return tt.TextTokenizer(tiny_spm_model)


@pytest.fixture(scope="module")
def vocab(tok):
    return vb.Vocabulary(tok, N_CODES, N_TOK, N_SENT)


def test_layout_ranges_partition_the_ids(vocab, tok):
    assert (vb.PAD_ID, vb.EOS_ID, vb.BREAK_ID, vb.EOSS_ID, vb.MASK_ID) == (0, 1, 2, 3, 4)
    assert vocab.num_specials == 5 + N_SENT == vocab.text_offset
    assert vocab.image_offset == vocab.text_offset + tok.vocab_size
    assert vocab.size == 5 + N_SENT + tok.vocab_size + N_CODES
    ids = np.arange(-3, vocab.size + 3)
    kinds = np.stack([vocab.is_special(ids), vocab.is_text(ids), vocab.is_image(ids)]).astype(int)
    inside = (ids >= 0) & (ids < vocab.size)
    assert (kinds.sum(0) == inside).all()  # each valid id in exactly one range, others in none
    assert [vocab.sentinel(i) for i in range(N_SENT)] == list(range(5, 5 + N_SENT))
    assert vocab.is_sentinel(np.arange(5, 5 + N_SENT)).all() and not vocab.is_sentinel(4)
    with pytest.raises(ValueError):
        vocab.sentinel(N_SENT)
    assert vocab.image_grid == (4, 4) and vocab.padded_size(128) % 128 == 0


def test_emittable_text_ranges_skip_reserved_pieces(vocab):
    ranges = vocab.emittable_text_ranges()
    ids = np.concatenate([np.arange(a, b) for a, b in ranges]).astype(np.int32)
    assert vocab.is_text(ids).all()
    reserved = np.setdiff1d(np.arange(vocab.text_offset, vocab.image_offset), ids)
    assert len(reserved) > 0  # SentencePiece's <unk>, controls and its own copies of our specials
    for i in reserved:
        with pytest.raises(ValueError, match="reserved"):
            vocab.decode_text(np.asarray([i], np.int32))
    assert isinstance(vocab.decode_text(ids), str)  # every id a decoder may draw decodes


def test_cm3leon_layout_of_a_caption_image_document(vocab):
    img = np.arange(N_TOK).reshape(4, 4)
    text = vocab.encode_text("a red circle")
    assert vocab.is_text(text).all()
    img_ids = vocab.image_offset + np.arange(N_TOK)
    br = [vb.BREAK_ID]
    np.testing.assert_array_equal(vocab.encode_document(["a red circle", img]),
                                  np.concatenate([text, br, img_ids, br]))
    np.testing.assert_array_equal(vocab.encode_document([img, "a red circle"]),
                                  np.concatenate([img_ids, br, text]))
    np.testing.assert_array_equal(vocab.encode_document([img, img.ravel()]),
                                  np.concatenate([img_ids, br, img_ids, br]))
    assert vocab.encode_document([]).shape == (0,) and vocab.decode_document([]) == []
    assert vocab.encode_document(["x", img]).dtype == np.int32


def _random_document(rng, texts):
    parts = []
    for _ in range(int(rng.integers(0, 7))):
        if parts and isinstance(parts[-1], str) or rng.random() < 0.5:
            codes = rng.integers(0, N_CODES, size=N_TOK)
            parts.append(codes.reshape(4, 4) if rng.random() < 0.5 else codes)
        else:
            parts.append(texts[int(rng.integers(len(texts)))])
    return parts


def test_documents_round_trip_in_any_order(vocab):
    texts = ["a small red circle at the top left", "<eos>caption with eos<eos>",
             "Image of <mask:0>: ", " <mask:7> a chameleon<eoss>", "ünïcödé 漢字 🙂 \u2581", "\n\t ",
             "<mask:99> and <mask:03> are plain text", "<pad>"]
    rng = np.random.default_rng(0)
    seen_orders = set()
    for _ in range(300):
        parts = _random_document(rng, texts)
        seen_orders.add(tuple(isinstance(p, str) for p in parts[:3]))
        tokens = vocab.encode_document(parts)
        back = vocab.decode_document(tokens)
        assert len(back) == len(parts)
        for p, q in zip(parts, back):
            if isinstance(p, str):
                assert q == p
            else:
                assert q.shape == (4, 4) and (q == np.asarray(p).reshape(4, 4)).all()
    assert len(seen_orders) >= 8


def test_special_strings_in_text_are_special_ids(vocab, tok):
    ids = vocab.encode_text("x<eos>y<mask:2><eoss><mask>")
    assert list(ids[vocab.is_special(ids)]) == [vb.EOS_ID, vocab.sentinel(2), vb.EOSS_ID, vb.MASK_ID]
    assert vocab.encode_text("<break>").tolist() == [vb.BREAK_ID]
    for plain in ("<mask:99>", "<mask:03>", "<mask:-1>"):
        ids = vocab.encode_text(plain)
        assert not vocab.is_special(ids).any() and vocab.decode_text(ids) == plain
    # The tokenizer's own ids for the specials are reserved: never emitted, rejected on decode.
    sp_break = vocab.text_offset + tok.piece_to_id("<break>")
    assert sp_break not in vocab.encode_text("a <break> b <eos>").tolist()
    with pytest.raises(ValueError, match="reserved"):
        vocab.decode_text([sp_break])


@pytest.mark.parametrize("parts, match", [
    (["cap", np.zeros(N_TOK - 1, int)], "15 codes"),
    (["cap", np.zeros(N_TOK + 1, int)], "17 codes"),
    ([np.zeros((2, 8), int)], "shape"),
    ([np.full(N_TOK, N_CODES)], "out of range"),
    ([np.full(N_TOK, -1)], "out of range"),
    ([np.zeros(N_TOK, np.float32)], "integers"),
    (["a <break> b"], "<break>"),
    (["", np.zeros(N_TOK, int)], "empty"),
    (["a", "b"], "adjacent"),
    ("just a string", "list of parts"),
])
def test_encode_rejects_malformed_documents(vocab, parts, match):
    with pytest.raises(ValueError, match=match):
        vocab.encode_document(parts)


def test_decode_rejects_malformed_token_streams(vocab):
    img = list(vocab.image_offset + np.arange(N_TOK))
    text = vocab.encode_text("a red circle").tolist()
    B = vb.BREAK_ID
    cases = {
        "unknown ids": [vocab.size],
        "unknown ids ": [-1],
        "has 15 tokens": text + [B] + img[:-1] + [B],
        "has 32 tokens": text + [B] + img + img + [B],
        "not followed by <break>": text + [B] + img,
        "without <break>": text + img + [B],
        "stray <break>": [B] + img + [B],
        "consecutive": text + [B, B] + img + [B],
        "not followed by an image": text + [B] + text,
        "reserved": [vocab.text_offset + vocab.text_tokenizer.unk_id],
    }
    for match, tokens in cases.items():
        with pytest.raises(ValueError, match=match.strip()):
            vocab.decode_document(np.asarray(tokens))
    with pytest.raises(ValueError, match="1-D"):
        vocab.decode_document(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="image token"):
        vocab.decode_text(img[:1])


def test_save_load_round_trip(vocab, tmp_path):
    vocab.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [vb.SPM_MODEL, vb.VOCAB_JSON]
    loaded = vb.Vocabulary.load(tmp_path)
    assert loaded.layout() == vocab.layout() and loaded.fingerprint == vocab.fingerprint
    loaded.check_compatible(vocab)
    vb.Vocabulary.load(tmp_path, expected_fingerprint=vocab.fingerprint)
    doc = ["a big blue star", np.arange(N_TOK)]
    np.testing.assert_array_equal(loaded.encode_document(doc), vocab.encode_document(doc))


def test_mismatches_are_clear_errors(vocab, tok, tmp_path):
    other = vb.Vocabulary(tok, N_CODES * 2, N_TOK, N_SENT)
    with pytest.raises(ValueError, match="num_image_codes"):
        vocab.check_compatible(other)
    vocab.save(tmp_path / "v")
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        vb.Vocabulary.load(tmp_path / "v", expected_fingerprint=other.fingerprint)
    # A different text tokenizer dropped in beside the JSON.
    other_spm = tt.train_sentencepiece(["completely different text corpus"] * 20,
                                       str(tmp_path / "other"), 300)
    (tmp_path / "v" / vb.SPM_MODEL).write_bytes(open(other_spm, "rb").read())
    with pytest.raises(ValueError, match="sha256"):
        vb.Vocabulary.load(tmp_path / "v")
    (tmp_path / "v" / vb.SPM_MODEL).write_bytes(b"")   # a truncated copy
    with pytest.raises(ValueError, match=r"spm\.model does not match .*vocab\.json.*not a SentencePiece model"):
        vb.Vocabulary.load(tmp_path / "v")
    # A hand-edited layout no longer matches its fingerprint.
    vocab.save(tmp_path / "w")
    meta = json.loads((tmp_path / "w" / vb.VOCAB_JSON).read_text())
    meta["num_image_codes"] = 999
    (tmp_path / "w" / vb.VOCAB_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint"):
        vb.Vocabulary.load(tmp_path / "w")
