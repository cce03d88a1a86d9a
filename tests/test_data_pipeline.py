import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

import data_pipeline
from cm3leon_jax import vocab as vocab_lib
from data_pipeline import cm3_pipeline, neighbours, prepare
from tests import pipeline_fixture


def test_prepared_documents_are_tokenized_caption_image_pairs(tiny_pipeline):
    data = tiny_pipeline["data"]
    with open(os.path.join(data, prepare.REPORT_FILE)) as f:
        report = json.load(f)
    assert report["splits"]["train"]["kept"] == 96 and report["splits"]["validation"]["kept"] == 16
    vocab = vocab_lib.Vocabulary.load(os.path.join(data, prepare.VOCAB_DIR))
    docs = prepare.load_documents(data, "train")
    tokens = prepare.load_tokens(data, "train")  # the training path's reader: id and tokens only
    assert len(docs) == len(tokens) == 96
    for i in (0, 5, 95):
        doc = docs[i]
        assert int(doc["id"]) == i == tokens[i]["id"]  # record i is document i: what the neighbour sidecar indexes
        np.testing.assert_array_equal(tokens[i]["tokens"], doc["tokens"])
        assert tokens[i]["tokens"].dtype == np.int32
        caption, codes = vocab.decode_document(doc["tokens"])
        assert caption == doc["caption"].decode() and "shape" not in json.loads(doc["meta"]).get("error", "")
        np.testing.assert_array_equal(codes.reshape(-1), doc["image_codes"])
        np.testing.assert_array_equal(vocab.encode_text(caption), doc["text_ids"])
        assert json.loads(doc["meta"])["objects"]  # ground truth travels with the document


def _write_png(path, size=16, color=(200, 30, 30)):
    Image.new("RGB", (size, size), color).save(path)


def test_ingesting_a_folder_skips_each_bad_file_with_its_reason(tiny_pipeline, tiny_spm_model, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    good = []
    for i in range(6):
        _write_png(src / f"good{i}.png", size=20 + i, color=(40 * i, 100, 50))
        (src / f"good{i}.txt").write_text(f"a red square number {i}\nsecond line ignored")
        good.append(f"good{i}.png")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (src / "corrupt.txt").write_text("a corrupt file")
    _write_png(src / "trunc.png", size=64, color=(1, 2, 3))
    data = (src / "trunc.png").read_bytes()
    (src / "trunc.png").write_bytes(data[: len(data) // 2])
    (src / "trunc.txt").write_text("a truncated file")
    _write_png(src / "empty.png")
    (src / "empty.txt").write_text("   \n")
    _write_png(src / "nocaption.png")
    _write_png(src / "latin1.png")
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    _write_png(src / "tiny.png", size=4)
    (src / "tiny.txt").write_text("a tiny image")
    _write_png(src / "special.png")
    (src / "special.txt").write_text("a caption that spells <break> inside")
    (src / "notes.md").write_text("not an image: counted")
    (src / "orphan.txt").write_text("a caption whose image is gone")
    nested = src / "sub" / "deeper"   # subfolders are walked; other formats PIL reads are kept
    nested.mkdir(parents=True)
    _write_png(nested / "nested.png", size=24, color=(9, 9, 200))
    (nested / "nested.txt").write_text("a nested blue square")
    Image.new("RGB", (24, 24), (0, 120, 0)).save(src / "sub" / "photo.TIFF")
    (src / "sub" / "photo.txt").write_bytes("\ufeffa caption saved with a byte-order mark\r\n".encode("utf-8"))
    # a transparent image composites onto white, as the VQ trainer sees it; 16-bit grey is scaled, not saturated
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(src / "clear.png")
    (src / "clear.txt").write_text("a transparent image")
    Image.fromarray(np.full((20, 20), 40_000, np.uint16)).save(src / "deep.png")
    (src / "deep.txt").write_text("a sixteen bit grey image")
    good += ["clear.png", "deep.png", "nested.png", "photo.TIFF"]

    cfg = pipeline_fixture.data_config(tiny_spm_model, tiny_pipeline["vq"], source="folder", folder=str(src),
                                       validation_fraction=0.0)
    vocab, encode = prepare.load_vocab_and_encoder(cfg)
    report = prepare.prepare(cfg, str(tmp_path / "out"), vocab, encode)["splits"]["train"]
    assert report["kept"] == 10
    assert report["skipped"] == {"unreadable_image": 2, "empty_caption": 1, "missing_caption": 1, "caption_not_utf8": 1,
                                 "image_too_small": 1, "caption_has_special_tokens": 1, "unsupported_file": 1,
                                 "caption_without_image": 1}
    reasons = {os.path.basename(key): reason for key, reason, _ in report["skipped_examples"]}
    assert reasons == {"corrupt.png": "unreadable_image", "trunc.png": "unreadable_image", "empty.png": "empty_caption",
                       "nocaption.png": "missing_caption", "latin1.png": "caption_not_utf8", "tiny.png": "image_too_small",
                       "special.png": "caption_has_special_tokens", "notes.md": "unsupported_file",
                       "orphan.txt": "caption_without_image"}
    docs = prepare.load_documents(str(tmp_path / "out"), "train")
    by_name = {os.path.basename(json.loads(docs[i]["meta"])["source"]): docs[i] for i in range(len(docs))}
    assert sorted(by_name) == sorted(good)
    assert by_name["good0.png"]["caption"].decode() == "a red square number 0"
    assert by_name["photo.TIFF"]["caption"].decode() == "a caption saved with a byte-order mark"
    for name, pixel in (("clear.png", 255), ("deep.png", round(40_000 / 257))):
        image = prepare.load_image(str(src / name), cfg.image_size, 1)
        assert image.shape == (cfg.image_size, cfg.image_size, 3) and np.all(image == pixel), name
    # a grey image as TFDS decodes it, [H, W, 1]
    assert np.all(prepare.load_image(np.full((20, 20, 1), 77, np.uint8), cfg.image_size, 1) == 77)


def _index_and_dropout_source(data_dir: str, vocab_size: int):
    """The retrieval stage on a tiny retriever, then the training source and transform with every
    condition dropped and no masking or neighbours (the query's layout, seen directly)."""
    from data_pipeline import index
    stats = index.build(data_dir, steps=2, batch_size=8, width=16, embed_dim=16, text_layers=1, image_layers=1,
                        num_heads=2)
    config = pipeline_fixture.lm_config(data_dir, vocab_size)
    config.data.update(condition_dropout_rate=1.0, cm3_masking=False, num_neighbours=0, seq_len=512)
    source, transform, _ = cm3_pipeline.training_source(config)
    return stats, source, transform


def test_text_only_documents_are_kept_on_request_and_index_and_train_beside_image_documents(
        tiny_pipeline, tiny_spm_model, tmp_path):
    rows = []
    for i in range(6):
        _write_png(tmp_path / f"im{i}.png", size=20, color=(40 * i, 100, 50))
        rows.append({"image": f"im{i}.png", "text": f"a red square number {i}"})
    texts = ["the sky is blue today", "a long story about circles and squares", "no picture here at all"]
    rows += [{"text": t} for t in texts[:2]] + [{"image": None, "text": texts[2]}]
    manifest = tmp_path / "manifest.jsonl"
    # bad lines: an image that is no path; an empty path (it read the manifest's folder as an unreadable image)
    bad = [{"image": 3, "text": "x"}, {"image": "", "text": "an empty path"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows + bad) + "\n")
    cfg = pipeline_fixture.data_config(tiny_spm_model, tiny_pipeline["vq"], source="jsonl", jsonl=str(manifest),
                                       validation_fraction=0.0)
    vocab, encode = prepare.load_vocab_and_encoder(cfg)
    # off (the default): text-only rows are skipped and counted, never silently turned into documents
    report = prepare.prepare(cfg, str(tmp_path / "images_only"), vocab, encode)["splits"]["train"]
    assert (report["kept"], report["text_only"], report["skipped"]) == (6, 0, {"no_image": 3, "bad_manifest_line": 2})
    cfg.text_only = True
    report = prepare.prepare(cfg, str(tmp_path / "out"), vocab, encode)["splits"]["train"]
    assert (report["kept"], report["text_only"], report["skipped"]) == (9, 3, {"bad_manifest_line": 2})
    docs = prepare.load_documents(str(tmp_path / "out"), "train")
    text_docs = [docs[i] for i in range(len(docs)) if len(docs[i]["image_codes"]) == 0]
    assert sorted(d["caption"].decode() for d in text_docs) == sorted(texts)
    for d in text_docs:                               # the text alone: no <break>, no image ids
        np.testing.assert_array_equal(d["tokens"], vocab.encode_text(d["caption"].decode()))
    # the retrieval stage embeds them by their text (the retriever trains on the 6 pairs)
    stats, source, transform = _index_and_dropout_source(str(tmp_path / "out"), tiny_pipeline["vocab_size"])
    assert stats["image_queries"] == 6 and stats["text_queries"] == 9
    # condition dropout leaves a text-only query whole (it has no image to guide): only captions go
    rng = np.random.default_rng(0)
    for i in range(len(source)):
        out, query = transform(source[i], rng)["tokens"], np.asarray(source[i]["tokens"])
        if len(docs[i]["image_codes"]):
            assert out[1] == vocab_lib.MASK_ID and len(out) < len(query) + 2
        else:
            np.testing.assert_array_equal(out, [vocab.eos_id, *query, vocab.eos_id])


def test_interleaved_documents_keep_their_parts_in_order_and_index_and_train(tiny_pipeline, tiny_spm_model, tmp_path):
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (90, 90, 90)]
    for i, color in enumerate(colors):
        _write_png(tmp_path / f"im{i}.png", size=20, color=color)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    interleaved = [
        [{"text": "a red square"}, {"image": "im0.png"}, {"text": "then a green one"}, {"image": "im1.png"}],
        [{"image": "im2.png"}, {"text": "a blue square after its picture"}],
        [{"text": "yellow"}, {"text": "and more yellow"}, {"image": "im3.png"}, {"text": "the end"}],
    ]
    rows = [{"segments": segs} for segs in interleaved] + [{"image": "im4.png", "text": "a plain pair"}]
    rows += [{"segments": [{"text": "has a hole"}, {"image": "im5.png"}, {"image": "broken.png"}]},   # skipped whole
             {"segments": [{"text": "  "}, {"image": "im5.png"}]},                                    # empty text part
             {"segments": [{"text": "x", "image": "im5.png"}]}, {"segments": []},                     # malformed
             {"segments": [{"text": 5}, {"image": "im5.png"}]}]   # not a string (was counted as an empty caption)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = pipeline_fixture.data_config(tiny_spm_model, tiny_pipeline["vq"], source="jsonl", jsonl=str(manifest),
                                       validation_fraction=0.0)
    vocab, encode = prepare.load_vocab_and_encoder(cfg)
    report = prepare.prepare(cfg, str(tmp_path / "out"), vocab, encode)["splits"]["train"]
    assert (report["kept"], report["interleaved"], report["text_only"]) == (4, 2, 0)
    assert report["skipped"] == {"unreadable_image": 1, "empty_caption": 1, "bad_manifest_line": 3}
    assert any(reason == "unreadable_image" and detail.startswith("segment 2:")
               for _, reason, detail in report["skipped_examples"])
    docs = prepare.load_documents(str(tmp_path / "out"), "train")
    by_source = {json.loads(docs[i]["meta"])["source"].rsplit(":", 1)[1]: docs[i] for i in range(len(docs))}
    codes = lambda *names: [np.asarray(encode(np.stack([prepare.load_image(str(tmp_path / n), cfg.image_size, 1)])))
                            .reshape(vocab.image_grid) for n in names]
    expected = {"1": ["a red square", *codes("im0.png"), "then a green one", *codes("im1.png")],
                "2": [*codes("im2.png"), "a blue square after its picture"],
                "3": ["yellow and more yellow", *codes("im3.png"), "the end"],
                "4": ["a plain pair", *codes("im4.png")]}
    tpi = vocab.image_tokens_per_image
    for line, parts in expected.items():
        doc = by_source[line]
        got = vocab.decode_document(doc["tokens"])   # the parts, in order, each image between <break>s
        assert [type(p) for p in got] == [type(p) for p in parts], line
        for a, b in zip(got, parts):
            if isinstance(b, str):
                assert a == b, line
            else:
                np.testing.assert_array_equal(a, b, err_msg=line)
        images = [p for p in parts if isinstance(p, np.ndarray)]
        np.testing.assert_array_equal(doc["image_codes"], np.concatenate([g.reshape(-1) for g in images]))
        text = " ".join(p for p in parts if isinstance(p, str))
        assert doc["caption"].decode() == text
        np.testing.assert_array_equal(doc["text_ids"], vocab.encode_text(text))
        assert ("parts" in json.loads(doc["meta"])) == (line in ("1", "3"))
    # retrieval: each document by its text and first image
    from data_pipeline import index
    texts, images = index.document_columns(docs, tpi)
    assert {len(c) for c in images} == {tpi}
    stats, source, transform = _index_and_dropout_source(str(tmp_path / "out"), tiny_pipeline["vocab_size"])
    assert stats["image_queries"] == 4 and stats["text_queries"] == 4
    # training: condition dropout replaces the text before the first image; the rest stays in order
    i = next(j for j in range(len(source)) if np.array_equal(source[j]["tokens"], by_source["1"]["tokens"]))
    out, query = transform(source[i], np.random.default_rng(0))["tokens"], np.asarray(source[i]["tokens"])
    first_break = int(np.flatnonzero(query == vocab_lib.BREAK_ID)[0])
    np.testing.assert_array_equal(out, [vocab.eos_id, vocab_lib.MASK_ID, *query[first_break:], vocab.eos_id])


def test_a_source_with_nothing_usable_fails_clearly(tiny_pipeline, tiny_spm_model, tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.png").write_bytes(b"garbage")
    (src / "a.txt").write_text("a caption for an unreadable image")
    cfg = pipeline_fixture.data_config(tiny_spm_model, tiny_pipeline["vq"], source="folder", folder=str(src),
                                       validation_fraction=0.0)
    vocab, encode = prepare.load_vocab_and_encoder(cfg)
    with pytest.raises(RuntimeError, match="no usable record in the train split.*unreadable_image"):
        prepare.prepare(cfg, str(tmp_path / "out"), vocab, encode)


def _stand_in_vq(spm_model):
    """A vocabulary on `spm_model` and a stand-in VQ encoder (a 4x4 grid of pixels as 16 codes):
    ingestion without training a tokenizer."""
    from cm3leon_jax.text_tokenizer import TextTokenizer
    vocab = vocab_lib.Vocabulary(TextTokenizer(spm_model), 16, 16, num_sentinels=4, image_grid=(4, 4))
    return vocab, lambda images: (np.asarray(images)[:, ::4, ::4, 0] % 16).astype(np.int32)


def test_another_sources_input_is_refused_before_any_work(tmp_path):
    """`--config.folder=DIR` without `--config.source=folder` ingested the shapes world, DIR unread."""
    for field, value, source in (("folder", str(tmp_path), "folder"), ("jsonl", "m.jsonl", "jsonl"),
                                 ("tfds_name", "coco_captions", "tfds")):
        cfg = pipeline_fixture.data_config("", "")
        cfg[field] = value
        with pytest.raises(ValueError, match=rf"config.{field}=.*set --config.source={source}"):
            prepare.prepare(cfg, str(tmp_path / "out"), None, None)
        assert not (tmp_path / "out").exists()


def test_overwriting_a_prepared_dataset_rebuilds_its_documents(tiny_spm_model, tmp_path):
    """TFDS reuses a dataset already in the directory: a rebuild kept the old documents under the
    new run's vocabulary and a report counting none kept."""
    from data_pipeline import shapes_world
    cfg = pipeline_fixture.data_config(tiny_spm_model, "", decode_threads=1)
    cfg.num_documents = {"train": 6, "validation": 0}
    vocab, encode = _stand_in_vq(tiny_spm_model)
    out = str(tmp_path / "out")
    prepare.prepare(cfg, out, vocab, encode)
    cfg.seed, cfg.num_documents = 1, {"train": 4, "validation": 0}   # another world, fewer documents
    report = prepare.prepare(cfg, out, vocab, encode)
    docs = prepare.load_documents(out, "train")
    assert report["splits"]["train"]["kept"] == len(docs) == 4
    world = shapes_world.ShapesWorld(shapes_world.ShapesWorldConfig(image_size=16, seed=1), "train")
    assert docs[0]["caption"].decode() == prepare.decode_caption(world[0]["caption"])


def test_reingesting_a_dataset_removes_the_neighbours_made_from_its_old_documents(tiny_spm_model, tmp_path):
    """The sidecar and the multi-host index parts are made from the documents: after a rebuild,
    `index` skipped the directory (it had neighbours.json) and a finished embed part, and training
    joined the old documents' neighbours by id."""
    from data_pipeline import index, index_parts
    cfg = pipeline_fixture.data_config(tiny_spm_model, "", decode_threads=1)
    cfg.num_documents = {"train": 6, "validation": 0}
    vocab, encode = _stand_in_vq(tiny_spm_model)
    out = str(tmp_path / "out")
    prepare.prepare(cfg, out, vocab, encode)
    embeddings = str(tmp_path / "e.npy")
    np.save(embeddings, np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))
    index.build(out, embeddings_path=embeddings)
    index_parts.embed_part(out, 2, 0, embeddings_path=embeddings)
    assert neighbours.load_neighbours(out, 6)[0].shape == (6, 4)
    cfg.seed = 1   # other documents, as many
    prepare.prepare(cfg, out, vocab, encode)
    with pytest.raises(FileNotFoundError, match="neighbour sidecar"):
        neighbours.load_neighbours(out, 6)
    assert not os.path.exists(os.path.join(out, index_parts.WORK_DIR))


def test_a_folder_source_walks_into_symlinked_subfolders_once(tmp_path):
    """os.walk skips symlinked directories by default: a dataset linked into the folder was left
    out of the ingestion (and of VQ training's image list) without a count."""
    import ml_collections
    from data_pipeline import images
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    _write_png(src / "a.png")
    (src / "a.txt").write_text("a caption")
    _write_png(elsewhere / "b.png")
    (elsewhere / "b.txt").write_text("b caption")
    os.symlink(elsewhere, src / "linked")
    os.symlink(src, src / "linked" / "back_up")   # a loop: each real directory is read once
    cfg = ml_collections.ConfigDict(dict(folder=str(src), validation_fraction=0.0))
    records = [(os.path.relpath(r.key, src), r.caption) for r in prepare.folder_records(cfg, "train", prepare.Shard())]
    assert records == [("a.png", b"a caption"), (os.path.join("linked", "b.png"), b"b caption")]
    assert [os.path.relpath(p, src) for p in images.list_image_files(str(src))] == ["a.png",
                                                                                    os.path.join("linked", "b.png")]


def test_a_folder_images_caption_file_may_be_spelled_in_capitals(tmp_path):
    """`B.PNG` + `B.TXT` (cameras, Windows tools): the caption file was taken for a sidecar and
    skipped, while the image looked only for `B.txt` and was counted as missing its caption."""
    import ml_collections
    _write_png(tmp_path / "B.PNG")
    (tmp_path / "B.TXT").write_text("a capital caption")
    _write_png(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("the lower-case one")
    (tmp_path / "c.TXT").write_text("a second caption file: counted, not read")
    cfg = ml_collections.ConfigDict(dict(folder=str(tmp_path), validation_fraction=0.0))
    records = {os.path.basename(r.key): r.caption or (r.meta or {}).get("reason")
               for r in prepare.folder_records(cfg, "train", prepare.Shard())}
    assert records == {"B.PNG": b"a capital caption", "c.png": b"the lower-case one", "c.TXT": "caption_without_image"}


def test_a_caption_with_nul_bytes_is_skipped_and_counted():
    """A zero-filled caption file (an interrupted copy) or UTF-16 text without a byte-order mark
    decodes as valid UTF-8 full of NULs, which no whitespace rule removes: it was kept as a caption."""
    for raw in (b"\x00" * 64, "a red circle".encode("utf-16-le"), "a red\u0000 circle"):
        with pytest.raises(prepare.SkipRecord) as skip:
            prepare.decode_caption(raw)
        assert skip.value.reason == "caption_has_nul", raw
    assert prepare.decode_caption("a red\tcircle\r") == "a red circle"


def test_more_neighbours_than_the_sidecar_stores_are_refused(tiny_spm_model, tmp_path):
    """data.num_neighbours above the sidecar's K joined at most K neighbours without a word."""
    from data_pipeline import index
    cfg = pipeline_fixture.data_config(tiny_spm_model, "", decode_threads=1)
    cfg.num_documents = {"train": 6, "validation": 0}
    vocab, encode = _stand_in_vq(tiny_spm_model)
    out = str(tmp_path / "out")
    prepare.prepare(cfg, out, vocab, encode)
    np.save(tmp_path / "e.npy", np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))
    index.build(out, embeddings_path=str(tmp_path / "e.npy"))
    config = pipeline_fixture.lm_config(out, vocab.padded_size())
    config.data.num_neighbours = 4   # the sidecar's k: fine
    cm3_pipeline.training_source(config)
    config.data.num_neighbours = 5
    with pytest.raises(ValueError, match="data.num_neighbours=5 but the neighbour sidecar of .* stores 4 per document"):
        cm3_pipeline.training_source(config)


def test_a_manifest_row_keeps_its_split_whatever_its_line_or_the_manifests_spelling(tmp_path, monkeypatch):
    import ml_collections
    rows = [json.dumps({"image": f"im{i}.png", "text": f"caption {i}"}) for i in range(200)]

    def splits(lines, manifest):
        (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
        cfg = ml_collections.ConfigDict(dict(jsonl=manifest, validation_fraction=0.2))
        return {split: [(r.image, r.caption) for r in prepare.jsonl_records(cfg, split, prepare.Shard())]
                for split in ("train", "validation")}

    before = splits(rows, str(tmp_path / "m.jsonl"))
    assert 20 < len(before["validation"]) < 60 and len(before["train"]) + len(before["validation"]) == 200
    monkeypatch.chdir(tmp_path)   # the same manifest by a relative path, one row inserted above, one given twice
    after = splits([json.dumps({"image": "new.png", "text": "a new row"})] + rows + [rows[7]], "m.jsonl")
    for split in ("train", "validation"):
        assert set(before[split]) <= set(after[split])
    assert after["train"].count(before["train"][0]) + after["validation"].count(before["train"][0]) == 1
    twice = (str(tmp_path / "im7.png"), "caption 7")
    assert any(r.count(twice) == 2 for r in after.values())   # both copies in one split

def _manifest_with_every_kind_of_row(tmp_path):
    """Pairs, text-only rows, an interleaved document and planted bad rows of every reason."""
    rows = []
    for i in range(14):
        _write_png(tmp_path / f"im{i}.png", size=18 + i % 5, color=(17 * i, 255 - 11 * i, 60))
        rows.append({"image": f"im{i}.png", "text": f"a square of colour number {i}"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not an image")
    rows[3:3] = [{"image": "broken.png", "text": "unreadable"}, {"text": "no picture, kept as text"}]
    rows[8:8] = [{"image": "im1.png", "text": "   "}, {"image": "missing.png", "text": "gone"},
                 {"segments": [{"text": "an interleaved one"}, {"image": "im2.png"}, {"text": "and on"}]}]
    rows.append({"image": "im4.png", "text": " ".join(["far too long"] * 40)})
    rows.append({"text": "another text-only row"})
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "{not json")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _assert_same_documents(a_dir, b_dir, split):
    a, b = prepare.load_documents(a_dir, split), prepare.load_documents(b_dir, split)
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=f"{split} {i} {key}")
    tokens = prepare.load_tokens(b_dir, split)   # the training reader: id = record index
    assert [tokens[i]["id"] for i in range(len(tokens))] == list(range(len(a)))


def test_ingestion_in_parts_merges_into_the_dataset_a_single_run_makes(tiny_pipeline, tiny_spm_model, tmp_path,
                                                                       monkeypatch):
    from data_pipeline import ingest_parts
    manifest = _manifest_with_every_kind_of_row(tmp_path)
    cfg = pipeline_fixture.data_config(tiny_spm_model, tiny_pipeline["vq"], source="jsonl", jsonl=str(manifest),
                                       validation_fraction=0.25, text_only=True, max_document_length=60)
    vocab, encode = prepare.load_vocab_and_encoder(cfg)
    cfg.decode_threads = 1   # serial here, decoding threads ahead in the parts: the same documents either way
    single = prepare.prepare(cfg, str(tmp_path / "single"), vocab, encode)
    cfg.decode_threads = 3
    splits = single["splits"].values()
    assert {reason for r in splits for reason in r["skipped"]} == {
        "unreadable_image", "empty_caption", "missing_image", "document_too_long", "bad_manifest_line"}
    assert sum(r["text_only"] for r in splits) == 2 and sum(r["interleaved"] for r in splits) == 1
    out = str(tmp_path / "sharded")
    for i in (2, 0, 1):   # any order, any host
        prepare.prepare(cfg, out, vocab, encode, shard_index=i, num_shards=3)
    # every raw record read by exactly one part: round robin over the source's order
    for split, whole in single["splits"].items():
        positions = [np.load(os.path.join(ingest_parts.part_dir(out, i, 3), f"{split}.positions.npy"))
                     for i in range(3)]
        assert all((ps % 3 == i).all() and (np.diff(ps) > 0).all() for i, ps in enumerate(positions))
        reports = []
        for i in range(3):
            with open(os.path.join(ingest_parts.part_dir(out, i, 3), ingest_parts.PART_REPORT)) as f:
                reports.append(json.load(f))
        assert sum(r["splits"][split]["kept"] for r in reports) == whole["kept"]
        assert sum(sum(r["splits"][split]["skipped"].values()) for r in reports) == sum(whole["skipped"].values())
    monkeypatch.setattr(ingest_parts, "FILE_BYTES", 1)   # a file a document, written by 2 processes
    merged = ingest_parts.merge_parts(out, workers=2, remove_parts=True)
    assert len(os.listdir(prepare.documents_dir(out))) == 2 + single["splits"]["train"]["kept"] + single["splits"][
        "validation"]["kept"]   # + dataset_info.json, features.json
    assert merged["parts"] == 3 and merged["splits"] == json.loads(json.dumps(single["splits"]))
    for split in single["splits"]:
        _assert_same_documents(str(tmp_path / "single"), out, split)
    assert not os.path.exists(os.path.join(out, ingest_parts.PARTS_DIR))
    assert vocab_lib.Vocabulary.load(os.path.join(out, prepare.VOCAB_DIR)).size == vocab.size


def test_the_first_skipped_records_are_in_source_order_in_a_single_run_and_a_merge(tiny_spm_model, tmp_path,
                                                                                     monkeypatch):
    """A document too long is skipped when its encode batch is encoded, after the later records'
    skips: the single run listed it after them, the merge of parts (ordered by position) before."""
    from data_pipeline import ingest_parts
    _write_png(tmp_path / "a.png")
    rows = [{"image": "a.png", "text": "a red square"}, {"image": "a.png", "text": " ".join(["far too long"] * 40)},
            {"image": "a.png", "text": "  "}, {"image": "gone.png", "text": "x"}, {"image": "gone.png", "text": "y"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = pipeline_fixture.data_config(tiny_spm_model, "", source="jsonl", jsonl=str(tmp_path / "m.jsonl"),
                                       validation_fraction=0.0, max_document_length=60, decode_threads=1)
    vocab, encode = _stand_in_vq(tiny_spm_model)
    monkeypatch.setattr(prepare, "MAX_SKIPPED_EXAMPLES", 2)
    single = prepare.prepare(cfg, str(tmp_path / "single"), vocab, encode)["splits"]["train"]
    assert [reason for _, reason, _ in single["skipped_examples"]] == ["document_too_long", "empty_caption"]
    for i in range(2):
        prepare.prepare(cfg, str(tmp_path / "multi"), vocab, encode, shard_index=i, num_shards=2)
    merged = ingest_parts.merge_parts(str(tmp_path / "multi"))["splits"]["train"]
    assert merged == json.loads(json.dumps(single))


def test_merge_refuses_unfinished_mixed_or_mismatched_parts(tiny_pipeline, tiny_spm_model, tmp_path):
    from data_pipeline import ingest_parts
    with pytest.raises(ValueError, match="0 <= shard_index < num_shards"):
        prepare.Shard(2, 2)
    cfg = pipeline_fixture.data_config(tiny_spm_model, tiny_pipeline["vq"])
    cfg.num_documents = {"train": 6, "validation": 0}
    vocab, encode = prepare.load_vocab_and_encoder(cfg)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        ingest_parts.merge_parts(out)
    for i in (0, 2):
        prepare.prepare(cfg, out, vocab, encode, shard_index=i, num_shards=3)
    with pytest.raises(ValueError, match="1 of 3 parts have not finished.*--shard_index 1"):
        ingest_parts.merge_parts(out)
    cfg.seed = 1   # another world: not the same source
    prepare.prepare(cfg, out, vocab, encode, shard_index=1, num_shards=3)
    with pytest.raises(ValueError, match=r"part 1 was ingested with a different config.*\['seed'\]"):
        ingest_parts.merge_parts(out)
    prepare.prepare(cfg, out, vocab, encode, shard_index=0, num_shards=2)
    with pytest.raises(ValueError, match=r"parts of \[2, 3\] shards"):
        ingest_parts.merge_parts(out)
    assert not os.path.exists(os.path.join(out, prepare.REPORT_FILE))


def test_prepare_flags_its_mode_does_not_read_are_refused(tmp_path):
    """--remove_parts / --merge_workers without --merge, and a part's --num_shards or --config with
    --merge, were ignored without a word."""
    from tests.helpers import REPO, cli_env
    config = os.path.join(REPO, "experiments", "data_shapes.py")
    for args, message in ((["--config", config, "--remove_parts"], "--remove_parts goes with --merge"),
                          (["--merge", "--num_shards", "4"], "--num_shards does not go with --merge")):
        run = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--out", str(tmp_path), *args],
                             capture_output=True, text=True, env=cli_env(1), timeout=300)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]


def test_slurm_ingest_submits_parts_then_a_dependent_merge_whose_scripts_build_the_dataset(
        tiny_pipeline, tiny_spm_model, tmp_path):
    """launch/slurm_ingest.sh for real, without Slurm (a fake sbatch; test_slurm_launch.py has its
    dry run): here because it needs the pipeline fixture's tokenizers, which this file builds anyway."""
    from tests.helpers import cli_env
    from tests.test_slurm_launch import BASH, _fake_sbatch_bin, _ingest
    env = cli_env(1)
    env["PATH"] = f"{_fake_sbatch_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    out = tmp_path / "data"
    res = _ingest(["--parts", "2", "--out", out, "--config", "experiments/data_shapes.py", "--remove_parts", "--",
                   f"--config.spm_model={tiny_spm_model}", f"--config.vq_workdir={tiny_pipeline['vq']}",
                   "--config.image_size=16", "--config.min_image_size=8", "--config.num_documents.train=10",
                   "--config.num_documents.validation=3"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    parts_file, merge_file = sorted(tmp_path.glob("*.parts.sbatch")), sorted(tmp_path.glob("*.merge.sbatch"))
    assert calls == [f"sbatch --parsable {parts_file[0].name}", f"sbatch --dependency=afterok:4242 {merge_file[0].name}"]
    # what Slurm would do: every array task, then the merge
    for task in range(2):
        run = subprocess.run([BASH, str(parts_file[0])], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env=dict(env, SLURM_ARRAY_TASK_ID=str(task)))
        assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([BASH, str(merge_file[0])], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / prepare.REPORT_FILE) as f:
        report = json.load(f)
    assert report["parts"] == 2 and {s: r["kept"] for s, r in report["splits"].items()} == {"train": 10, "validation": 3}
    assert len(prepare.load_documents(str(out), "train")) == 10 and not (out / "parts").exists()


def test_training_rows_join_stored_neighbours_in_the_cm3leon_layout(tiny_pipeline):
    config = pipeline_fixture.lm_config(tiny_pipeline["data"], tiny_pipeline["vocab_size"])
    config.data.update(condition_dropout_rate=0.0, cm3_masking=False, num_neighbours=2, seq_len=512)
    docs, transform, vocab = cm3_pipeline.training_source(config)
    ids, _, _ = neighbours.load_neighbours(tiny_pipeline["data"])
    rng = np.random.default_rng(0)
    checked = 0
    for i in range(len(docs)):
        doc = docs[i]
        out = transform(doc, rng)["tokens"]
        query = np.asarray(doc["tokens"])
        assert out[0] == vocab.eos_id and out[-1] == vocab.eos_id
        np.testing.assert_array_equal(out[-1 - len(query):-1], query)  # the query comes last
        body = out[1:-1 - len(query)]
        valid = [int(j) for j in ids[i] if j >= 0]
        # the neighbours in front are whole stored candidates of this document, never itself
        pos, used = 0, []
        while pos < len(body):
            match = [j for j in valid if j not in used and np.array_equal(body[pos:pos + len(docs[j]["tokens"])], docs[j]["tokens"])]
            assert match, f"document {i}: unexpected tokens at {pos}"
            used.append(match[0])
            pos += len(docs[match[0]]["tokens"])
        assert i not in used and len(used) == min(2, len(valid))
        checked += bool(used)
    assert checked > 50


def test_held_out_rows_are_validation_documents_under_the_objective_without_neighbours(tiny_pipeline, tmp_path):
    config = pipeline_fixture.lm_config(tiny_pipeline["data"], tiny_pipeline["vocab_size"])
    config.data.update(condition_dropout_rate=0.5, cm3_masking=False, num_neighbours=2, seq_len=512)
    docs, transform = cm3_pipeline.heldout_source(config)
    validation = prepare.load_tokens(tiny_pipeline["data"], "validation")
    assert len(docs) == len(validation) > 0
    vocab = vocab_lib.Vocabulary.load(os.path.join(tiny_pipeline["data"], prepare.VOCAB_DIR))
    rng = np.random.default_rng(0)
    for i in range(len(docs)):   # `<eos> query <eos>`: no neighbour, and the caption never dropped
        np.testing.assert_array_equal(transform(docs[i], rng)["tokens"],
                                      [vocab.eos_id, *validation[i]["tokens"], vocab.eos_id])
    # the trainer's eval batches are those rows, packed
    config.data.update(seq_len=128, global_batch_size=4)
    config.eval_batches = 2
    batches = data_pipeline.make_eval_batches(config, 0, 1)
    layouts = {tuple([vocab.eos_id, *validation[i]["tokens"]]) for i in range(len(validation))}
    segments = 0
    for batch in batches:
        assert batch["inputs"].shape == (4, 128)
        for row, seg in zip(batch["inputs"], batch["segment_ids"]):
            for s in set(seg[seg > 0].tolist()):
                assert tuple(row[seg == s].tolist()) in layouts   # inputs: the layout less its last token
                segments += 1
    assert segments > 4
    # data prepared without a validation split: refused at start-up, saying how to turn it off
    data = tmp_path / "data"
    shutil.copytree(tiny_pipeline["data"], data)
    info_path = next(data.rglob("dataset_info.json"))
    info = json.loads(info_path.read_text())
    info["splits"] = [split for split in info["splits"] if split["name"] != "validation"]
    info_path.write_text(json.dumps(info))
    config.data.data_dir = str(data)
    with pytest.raises(ValueError, match="eval_every_steps=0 turns it off.*no 'validation' split"):
        data_pipeline.make_eval_batches(config, 0, 1)


def test_training_mixes_prepared_datasets_by_weight_each_with_its_own_neighbours(tiny_pipeline, tmp_path):
    a = tiny_pipeline["data"]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    ids_a, _, _ = neighbours.load_neighbours(a, mmap=False)
    n = len(ids_a)
    ids_b = np.full_like(ids_a, -1)                   # b's sidecar: each document's only candidate is the next one
    ids_b[:, 0] = (np.arange(n) + 1) % n
    np.save(b / json.loads((b / neighbours.NEIGHBOURS_JSON).read_text())["ids"], ids_b)
    config = pipeline_fixture.lm_config(a, tiny_pipeline["vocab_size"])
    config.data.update(condition_dropout_rate=0.0, cm3_masking=False, num_neighbours=1, seq_len=512,
                       mix_with=f"{b}=3", data_dir_weight=1.0)
    docs, transform, vocab = cm3_pipeline.training_source(config)
    tokens = prepare.load_tokens(a, "train")
    epoch = [docs[i] for i in range(2 * n)]           # one mixture epoch: as many slots as both datasets' documents
    parts = [int(d[cm3_pipeline.PART_KEY]) for d in epoch]
    assert parts == [0] * (n // 2) + [1] * (3 * n // 2)  # a:b = 1:3, by the weights
    assert [int(d["id"]) for d in epoch[n // 2:]] == list(range(n)) + list(range(n // 2))   # b cycles on
    assert len(docs) == 2 * n   # one epoch; an index past it reads the next (Grain hands the epoch on)
    assert [int(docs[i]["id"]) for i in range(2 * n, 2 * n + n // 2)] == list(range(n // 2, n))   # a's next epoch moves on
    rng = np.random.default_rng(0)
    for d in epoch[::7]:
        out, query = transform(d, rng)["tokens"], np.asarray(d["tokens"])
        own = ids_b if d[cm3_pipeline.PART_KEY] else ids_a   # neighbours from the document's own dataset
        candidates = [np.asarray(tokens[int(j)]["tokens"]) for j in own[int(d["id"])] if j >= 0]
        assert any(np.array_equal(out[1:-1 - len(query)], c) for c in candidates), int(d["id"])
        np.testing.assert_array_equal(out[-1 - len(query):-1], query)
    # the packed batches are deterministic like any others
    first = [next(data_pipeline.make_train_iterator(config, 0, 1))["inputs"] for _ in range(2)]
    np.testing.assert_array_equal(*first)
    config.data.worker_count = 1   # the mixture view (a Grain dataset, not a source) survives the trip into a worker
    worker = data_pipeline.make_train_iterator(config, 0, 1)
    np.testing.assert_array_equal(next(worker)["inputs"], first[0])
    worker.close()
    config.data.worker_count = 0
    # refused clearly: malformed, not prepared data, another vocabulary, a non-cm3 source
    for mix_with, match in (("nonsense", "expected DIR=WEIGHT"), (f"{b}=-1", "weights must be >= 0"),
                            (f"{tmp_path}=1", "not a directory made by")):
        config.data.mix_with = mix_with
        with pytest.raises(ValueError, match=match):
            cm3_pipeline.training_source(config)
    theirs = vocab_lib.Vocabulary.load(os.path.join(a, prepare.VOCAB_DIR))
    shutil.rmtree(b / prepare.VOCAB_DIR)
    vocab_lib.Vocabulary(theirs.text_tokenizer, theirs.num_image_codes, theirs.image_tokens_per_image,
                         num_sentinels=8).save(str(b / prepare.VOCAB_DIR))
    config.data.mix_with = f"{b}=1"
    with pytest.raises(ValueError, match="not prepared with the vocabulary of data.data_dir.*spm_model=.*spm.model"):
        cm3_pipeline.training_source(config)
    from cm3leon_jax import sharding, trainer
    synthetic = pipeline_fixture.tiny_config(**{"data.mix_with": f"{b}=1"})
    with pytest.raises(ValueError, match="data.mix_with mixes prepared cm3 datasets"):
        trainer.validate_config(synthetic, sharding.make_mesh(synthetic.mesh), 1)


def test_mixture_weights_must_be_finite():
    """An inf weight used to pass parse_weights and die in mixing_counts with 'cannot convert float
    NaN to integer'; a NaN data.data_dir_weight silently dropped data_dir from the mixture."""
    from data_pipeline import mixture
    with pytest.raises(ValueError, match="bad weight 'b=inf'.*>= 0 and finite"):
        mixture.parse_weights("a=1,b=inf")
    for weight in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="mixture weights must be >= 0 and finite"):
            mixture.mixing_counts({"a": 10, "b": 10}, {"a": weight, "b": 1.0})


def test_a_mixture_stream_draws_every_slot_of_an_epoch_once_and_reshuffles_each_epoch():
    """The view spanned 1,000 mixture epochs shuffled at once: within an epoch's worth of training a
    part's documents were drawn nearly with replacement (785 distinct of 1,250 draws)."""
    import collections
    from data_pipeline import mixture
    from data_pipeline.packing import PackedBatchIterator
    # part a: 40 documents, 20 an epoch (down-sampled, cycling on); part b: 10 documents, 20 an epoch (each twice)
    a = [{"tokens": np.full(5, 100 + i, np.int32)} for i in range(40)]
    b = [{"tokens": np.full(5, 200 + i, np.int32)} for i in range(10)]
    view = mixture.MixedDocuments([mixture.Part(a, 0, 40), mixture.Part(b, 0, 10)], [20, 20])
    assert len(view) == 40 and view[40 + 3]["tokens"][0] == 120 + 3   # epoch 1 reads on through part a
    it = PackedBatchIterator(view, seq_len=4, global_batch_size=1, num_streams=1, seed=0)   # a document a row
    drawn = [int(next(it)["inputs"][0, 0]) for _ in range(120)]
    for epoch in range(3):
        counts = collections.Counter(drawn[40 * epoch:40 * epoch + 40])
        start = 100 + 20 * (epoch % 2)
        assert counts == {**{d: 1 for d in range(start, start + 20)}, **{d: 2 for d in range(200, 210)}}, epoch
    assert drawn[:40] != drawn[80:]   # epochs 0 and 2 draw the same documents, in another order
    # resumed mid-epoch from a saved position: the same draws follow
    again = PackedBatchIterator(view, seq_len=4, global_batch_size=1, num_streams=1, seed=0)
    for _ in range(30):
        next(again)
    state = again.get_state()
    resumed = PackedBatchIterator(view, seq_len=4, global_batch_size=1, num_streams=1, seed=0)
    resumed.set_state(state)
    assert [int(next(resumed)["inputs"][0, 0]) for _ in range(20)] == drawn[30:50]


def test_a_dataset_given_two_mixture_weights_is_refused():
    """Named twice (or data_dir named in mix_with), a dataset became two parts of the mixture, its
    share the sum of the weights; SFT's task weights kept the last one: both silently."""
    from data_pipeline import mixture
    data = ml_collections.ConfigDict(dict(data_dir="w/a", data_dir_weight=1.0, mix_with="w/b=1,w/c=2"))
    assert cm3_pipeline.mixture_parts(data) == [("w/a", 1.0), ("w/b", 1.0), ("w/c", 2.0)]
    with pytest.raises(ValueError, match="'w/b' is given a weight more than once"):
        mixture.parse_weights("w/b=1,w/b=3", what="DIR")
    for mix_with, match in (("w/b=1,w/c=1,./w/b/=2", "names the directory .*w/b more than once"),
                            ("w/b=1,w/a=3", r"names data.data_dir \(w/a\); its weight is data.data_dir_weight")):
        data.mix_with = mix_with
        with pytest.raises(ValueError, match=match):
            cm3_pipeline.mixture_parts(data)
    data.mix_with = "w/b=1"   # a bad data_dir_weight is named (the mixture's error listed {'0': -1.0, ...})
    for weight in (-1.0, float("nan"), float("inf")):
        data.data_dir_weight = weight
        with pytest.raises(ValueError, match=r"data.data_dir_weight=.* must be a finite number >= 0"):
            cm3_pipeline.mixture_parts(data)


def test_a_mixture_logs_each_datasets_held_out_loss(tiny_pipeline, tmp_path):
    from cm3leon_jax import trainer
    b = tmp_path / "shapes b"
    shutil.copytree(tiny_pipeline["data"], b)      # the same validation split as data_dir: the same loss
    config = pipeline_fixture.lm_config(tiny_pipeline["data"], tiny_pipeline["vocab_size"], total_steps=2,
                                        eval_every_steps=2, eval_batches=1)
    config.data.update(seq_len=256, mix_with=f"{b}=1")
    trainer.train(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        record = [json.loads(line) for line in f][-1]
    assert record["step"] == 2 and record["eval_tokens"] > 0
    assert (record["eval_loss_shapes_b"], record["eval_tokens_shapes_b"]) == (record["eval_loss"], record["eval_tokens"])
    # metric names: the directory's name, numbered when two directories share one
    config.data.mix_with = "x/data=1,y/data=2,z/other/=1"
    assert [name for name, _ in data_pipeline.heldout_sets(config)] == ["", "_data", "_data_2", "_other"]
    assert data_pipeline.heldout_sets(config)[2][1].data.data_dir == "y/data"


def test_cm3_batches_are_deterministic_and_split_between_processes(tiny_pipeline):
    config = pipeline_fixture.lm_config(tiny_pipeline["data"], tiny_pipeline["vocab_size"])
    a = data_pipeline.make_train_iterator(config, 0, 1)
    batches = [next(a) for _ in range(3)]
    state = a.get_state()
    following = next(a)
    b = data_pipeline.make_train_iterator(config, 0, 1)
    for x in batches:
        np.testing.assert_array_equal(next(b)["inputs"], x["inputs"])
    c = data_pipeline.make_train_iterator(config, 0, 1)
    c.set_state(state)
    np.testing.assert_array_equal(next(c)["inputs"], following["inputs"])
    halves = [next(data_pipeline.make_train_iterator(config, p, 2)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), batches[0]["inputs"])
    # sentinels carry no loss: wherever a target is a sentinel its weight is 0
    for x in batches:
        sentinel = (x["targets"] >= vocab_lib.SENTINEL_OFFSET) & (x["targets"] < vocab_lib.SENTINEL_OFFSET + 16)
        assert np.all(x["weights"][sentinel] == 0)


def test_neighbours_cut_to_fit_seq_len_are_counted(tiny_pipeline):
    """A seq_len too short for a document and its neighbours dropped them without a word (the README's
    tiny_cpu command on the shapes data trained with none of its 3)."""
    from data_pipeline import cm3
    cut = {}
    for seq_len in (64, 512):
        config = pipeline_fixture.lm_config(tiny_pipeline["data"], tiny_pipeline["vocab_size"])
        config.data.seq_len = seq_len
        it = data_pipeline.make_train_iterator(config, 0, 1)
        for _ in range(2):
            next(it)
        cut[seq_len] = it.skipped[cm3.NEIGHBOURS_CUT]
    assert cut[64] > 0 and cut[512] == 0
    assert json.loads(it.get_state())["skipped"] == {}   # 512: nothing cut, no document skipped


def test_cm3_batches_from_a_worker_process_match_in_process_ones(tiny_pipeline):
    """One Grain worker runs the same pipeline unsliced: the document reader and the memory-mapped
    neighbour sidecar survive the trip into the worker and give identical batches."""
    config = pipeline_fixture.lm_config(tiny_pipeline["data"], tiny_pipeline["vocab_size"])
    local = data_pipeline.make_train_iterator(config, 0, 1)
    config.data.worker_count = 1
    worker = data_pipeline.make_train_iterator(config, 0, 1)
    for _ in range(3):
        x, y = next(local), next(worker)
        for key in data_pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    worker.close()


def test_trainer_refuses_a_model_smaller_than_the_vocabulary(tiny_pipeline):
    config = pipeline_fixture.lm_config(tiny_pipeline["data"], 64)
    with pytest.raises(ValueError, match="model.vocab_size=64"):
        data_pipeline.make_train_iterator(config, 0, 1)


def _data_without_neighbours(tiny_pipeline, dest):
    """A copy of the fixture's prepared data with its retriever but no index or neighbours."""
    shutil.copytree(tiny_pipeline["data"], dest, ignore=shutil.ignore_patterns("neighbours*", "scann_index"))
    return str(dest)


def test_retrieval_split_over_hosts_equals_the_one_host_run_and_resumes(tiny_pipeline, tmp_path):
    from data_pipeline import index, index_parts
    single = _data_without_neighbours(tiny_pipeline, tmp_path / "single")
    multi = _data_without_neighbours(tiny_pipeline, tmp_path / "multi")
    hosts, shards = 2, 3
    index.build(single, num_shards=shards)
    with pytest.raises(ValueError, match=r"2 of 2 hosts have not finished the embed stage .*--host_index h` for h in 0, 1"):
        index_parts.search_part(multi, hosts, 0, num_shards=shards)
    for h in range(hosts):
        index_parts.embed_part(multi, hosts, h)
    with pytest.raises(ValueError, match="fewer than --num_hosts"):
        index_parts.search_part(multi, hosts, 0, num_shards=1)
    index_parts.search_part(multi, hosts, 0, num_shards=shards, candidates=96)   # C = N: as wide as the single run
    with pytest.raises(ValueError, match=r"1 of 2 hosts have not finished the search stage .* for h in 1$"):
        index_parts.select_part(multi, hosts, 0)
    index_parts.search_part(multi, hosts, 1, num_shards=shards, candidates=96)
    for h in range(hosts):
        index_parts.select_part(multi, hosts, h)
    stats = index_parts.finish(multi)

    expected_ids, expected_scores, expected_meta = neighbours.load_neighbours(single)
    ids, scores, meta = neighbours.load_neighbours(multi)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores)
    for key, value in expected_meta["stats"].items():
        if "seconds" not in key:
            assert stats[key] == value == meta["stats"][key], key
    assert (stats["num_hosts"], stats["candidates"]) == (hosts, 96)
    # the shards the hosts built are the index generation loads
    query = np.load(os.path.join(index_parts.part_dir(multi, "embed", 1, hosts), "text_query.npy"))[:4]
    for a, b in zip(neighbours.load_index(os.path.join(multi, "scann_index")).search(query, 8),
                    neighbours.load_index(os.path.join(single, "scann_index")).search(query, 8)):
        np.testing.assert_array_equal(a, b)

    # a finished part is not redone; --overwrite redoes it; another host's different flags are refused
    embed_json = os.path.join(index_parts.part_dir(multi, "embed", 0, hosts), index_parts.PART_JSON)
    stamp = os.stat(embed_json).st_mtime_ns
    index_parts.embed_part(multi, hosts, 0)
    assert os.stat(embed_json).st_mtime_ns == stamp
    # a redone embed part (other embeddings, say) makes the parts made from it stale: redone, never reused
    index_parts.embed_part(multi, hosts, 0, overwrite=True)
    with pytest.raises(ValueError, match=r"the select parts of hosts \[0, 1\] were made from earlier embed/search"):
        index_parts.finish(multi)
    with pytest.raises(ValueError, match=r"the search parts of hosts \[0, 1\] were made from earlier embed parts"):
        index_parts.select_part(multi, hosts, 0)
    search_json = os.path.join(index_parts.part_dir(multi, "search", 0, hosts), index_parts.PART_JSON)
    stamp = os.stat(search_json).st_mtime_ns
    index_parts.search_part(multi, hosts, 0, num_shards=shards, candidates=96)
    assert os.stat(search_json).st_mtime_ns != stamp
    index_parts.search_part(multi, hosts, 1, num_shards=shards, candidates=8, overwrite=True)
    with pytest.raises(ValueError, match=r"host 1's search part differs from host 0's in \['candidates'\]"):
        index_parts.select_part(multi, hosts, 0, overwrite=True)
    # fewer candidates than the single run's widest search: fewer neighbours, never the document itself
    index_parts.search_part(multi, hosts, 0, num_shards=shards, candidates=8, overwrite=True)
    for h in range(hosts):
        index_parts.select_part(multi, hosts, h, overwrite=True)
    narrow = index_parts.finish(multi, remove_parts=True)
    ids, _, _ = neighbours.load_neighbours(multi)
    assert narrow["max_candidates"] == 8 and narrow["mean_neighbours"] <= stats["mean_neighbours"]
    assert not (ids == np.arange(len(ids))[:, None]).any() and (ids >= 0).any()
    assert not os.path.exists(os.path.join(multi, index_parts.WORK_DIR))

    shutil.rmtree(os.path.join(multi, "retriever"))
    with pytest.raises(ValueError, match="--stage train"):
        index_parts.embed_part(multi, hosts, 0)
    with pytest.raises(ValueError, match=r"--host_index must be in \[0, 2\)"):
        index_parts.embed_part(multi, hosts, 2)


def test_a_trained_retriever_is_reused_only_for_the_same_settings_and_documents(tiny_pipeline, tmp_path):
    from cm3leon_jax import retriever
    from data_pipeline import index
    data = str(tmp_path / "data")
    shutil.copytree(tiny_pipeline["data"], data, ignore=shutil.ignore_patterns("retriever"))
    texts, images = index.document_columns(prepare.load_documents(data, "train"), index.image_tokens_of(data))
    tiny = dict(steps=2, batch_size=8, width=16, embed_dim=16, text_layers=1, image_layers=1, num_heads=2)
    saved = os.path.join(data, retriever.RETRIEVER_SUBDIR, retriever.CONFIG_JSON)

    def trained(**kw):
        index.train_or_load_retriever(data, kw.pop("texts", texts), kw.pop("images", images), **{**tiny, **kw})
        return os.stat(saved).st_mtime_ns, json.load(open(saved))

    first, record = trained()
    assert record["trained_on"]["num_documents"] == 96
    assert trained(log_every=7)[0] == first                 # logging only: reused
    index.train_or_load_retriever(data, texts, images)      # nothing asked for: whatever was trained there
    assert os.stat(saved).st_mtime_ns == first
    second, record = trained(steps=3)                       # other settings: trained again
    assert second != first and record["config"]["steps"] == 3
    third, record = trained(steps=3, texts=texts[:90], images=images[:90])   # other documents: trained again
    assert third != second and record["trained_on"]["num_documents"] == 90

def test_index_flags_and_inputs_are_checked_before_any_work(tiny_pipeline, tmp_path):
    from data_pipeline import index
    from tests.helpers import cli_env
    for args, message in ((["--stage", "train", "--embeddings", str(tmp_path / "x.npy")], "go with --stage all or embed"),
                          (["--num_shards", "0", "--overwrite"], "--num_shards must be >= 1, got 0")):
        run = subprocess.run([sys.executable, "-m", "data_pipeline.index", "--data", tiny_pipeline["data"], *args],
                             capture_output=True, text=True, env=cli_env(1), timeout=300)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    with pytest.raises(ValueError, match=r"--num_shards 97 must be in \[1, 96\]"):
        index.build(tiny_pipeline["data"], num_shards=97)
    with pytest.raises(FileNotFoundError, match="is not a dataset made by `python -m data_pipeline.prepare`"):
        index.build(str(tmp_path))

def test_index_flags_a_stage_does_not_read_are_refused(tmp_path):
    """--steps with user embeddings, --candidates or --num_shards outside the stages that read them,
    --remove_parts before finish: each was ignored without a word."""
    from tests.helpers import cli_env
    for args, message in ((["--embeddings", str(tmp_path / "x.npy"), "--steps", "5"], "--steps trains our retriever"),
                          (["--candidates", "64"], "--candidates goes with --stage search, not all"),
                          (["--stage", "select", "--num_hosts", "2", "--host_index", "0", "--num_shards", "4"],
                           "--num_shards goes with --stage all or search, not select")):
        run = subprocess.run([sys.executable, "-m", "data_pipeline.index", "--data", str(tmp_path), *args],
                             capture_output=True, text=True, env=cli_env(1), timeout=300)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]


def test_slurm_index_chain_of_stage_scripts_builds_the_one_host_sidecar_from_user_embeddings(tiny_pipeline, tmp_path):
    """launch/slurm_index.sh for real, without Slurm (a fake sbatch; test_slurm_launch.py has its
    dry run), through the `python -m data_pipeline.index --stage` CLI, on embeddings of the user's."""
    from data_pipeline import index, index_parts
    from tests.helpers import cli_env
    from tests.test_slurm_launch import BASH, _fake_sbatch_bin, _index
    single = _data_without_neighbours(tiny_pipeline, tmp_path / "single")
    multi = _data_without_neighbours(tiny_pipeline, tmp_path / "multi")
    embeddings = str(tmp_path / "mine.npy")
    np.save(embeddings, np.random.default_rng(0).standard_normal((96, 16)).astype(np.float32))
    index.build(single, embeddings_path=embeddings, num_shards=2)
    env = cli_env(1)
    env["PATH"] = f"{_fake_sbatch_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    res = _index(["--hosts", "2", "--data", multi, "--embeddings", embeddings, "--candidates", "96", "--remove_parts"],
                 env, tmp_path)
    assert res.returncode == 0, res.stderr
    files = {p.name.split(".")[-2]: p for p in tmp_path.glob("*.sbatch")}
    assert sorted(files) == ["embed", "finish", "search", "select"]   # user embeddings: no retriever to train
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [f"sbatch --parsable {files['embed'].name}"] + [
        f"sbatch --parsable --dependency=afterok:4242 {files[s].name}" for s in ("search", "select", "finish")]
    for stage in ("embed", "search", "select", "finish"):   # what Slurm would do: each stage's tasks in turn
        for task in (range(2) if stage != "finish" else [None]):
            run = subprocess.run([BASH, str(files[stage])], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                                 env=dict(env, **({} if task is None else {"SLURM_ARRAY_TASK_ID": str(task)})))
            assert run.returncode == 0, (stage, run.stderr[-3000:])
        if stage == "search":   # one query per document serves both lists: searched and stored once
            assert sorted(os.listdir(index_parts.part_dir(multi, "search", 1, 2))) == [
                "part.json", "query_ids.npy", "query_scores.npy"]
    for a, b in zip(neighbours.load_neighbours(single)[:2], neighbours.load_neighbours(multi)[:2]):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(os.path.join(multi, "index_parts"))
