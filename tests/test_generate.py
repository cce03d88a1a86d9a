import dataclasses
import importlib.util
import json
import os
import types

import jax
import numpy as np
import pytest
from PIL import Image

from cm3leon_jax import generate, sampling
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def generator(tiny_pipeline):
    return generate.Generator(tiny_pipeline["lm"])


def test_text_to_image_mixes_strategies_reranks_and_is_seeded(generator):
    config = sampling.SamplingConfig(top_p=0.9, cfg_scale=3.0)
    samples = generator.text_to_image(["a small red circle at the top left", "a large blue square"], num_samples=4,
                                      config=config, cd_fraction=0.5, seed=1)
    assert len(samples) == 2
    for s in samples:
        assert s.images.shape == (4, 16, 16, 3) and s.images.dtype == np.uint8
        assert s.codes.shape == (4, 4, 4) and s.codes.min() >= 0 and s.codes.max() < generator.vocab.num_image_codes
        assert sorted(s.strategies) == ["cdk", "cdk", "topp", "topp"]
        assert np.all(np.diff(s.scores) <= 1e-6)  # best first
        np.testing.assert_allclose(s.scores, generator.rerank_scores(s.caption, s.codes), atol=1e-5)
    again = generator.text_to_image(["a small red circle at the top left"], num_samples=4, config=config,
                                    cd_fraction=0.5, seed=1)
    np.testing.assert_array_equal(again[0].codes, samples[0].codes)


def test_text_to_image_samples_depend_on_their_caption_index_not_the_batch(generator):
    kwargs = dict(num_samples=3, config=sampling.SamplingConfig(top_p=0.9, cfg_scale=3.0), cd_fraction=1 / 3,
                  rerank=False, seed=2)
    captions = ["a small red circle at the top left", "a large blue square", "a green triangle"]
    wide = generator.text_to_image(captions, batch_size=32, **kwargs)
    narrow = generator.text_to_image(captions, batch_size=2, **kwargs)
    for a, b in zip(wide, narrow):
        np.testing.assert_array_equal(a.codes, b.codes)
        assert a.strategies == b.strategies == ["topp", "topp", "cdk"]
    alone = generator.text_to_image([captions[2]], indices=[2], batch_size=5, **kwargs)[0]
    np.testing.assert_array_equal(alone.codes, wide[2].codes)
    np.testing.assert_allclose(alone.logprobs, wide[2].logprobs, rtol=1e-5)
    assert not np.array_equal(generator.text_to_image([captions[2]], **kwargs)[0].codes, wide[2].codes)  # index 0
    with pytest.raises(ValueError, match="1 indices for 2 captions"):
        generator.text_to_image(captions[:2], indices=[0], **kwargs)



def test_cd_share_rounds_half_up():
    assert [generate.cd_sample_count(0.5, n) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    assert [generate.cd_sample_count(f, 3) for f in (0.0, 1 / 3, 2 / 3, 1.0)] == [0, 1, 2, 3]


def test_text_to_image_refuses_bad_sample_counts_and_labels_a_cd_k_config(generator):
    # cd_fraction 1.5 of 2 samples used to draw 3 (all "cdk"), -0.5 drew 3 "topp"; 0 samples failed in np.stack
    for kwargs in (dict(cd_fraction=1.5), dict(cd_fraction=-0.5), dict(num_samples=0)):
        with pytest.raises(ValueError, match="num_samples >= 1 and cd_fraction in"):
            generator.text_to_image(["a red circle"], **{"num_samples": 2, **kwargs})
    with pytest.raises(TypeError, match="a list of captions"):   # a str drew one image set per character
        generator.text_to_image("a red circle", num_samples=1)
    # `generate --cd_k 2` (no --cd_fraction) draws every sample by CD-K: they were labelled "topp"
    s = generator.text_to_image(["a red circle"], num_samples=1, config=sampling.SamplingConfig(cd_k=2), rerank=False)
    assert s[0].strategies == ["cdk"]

def test_prompts_file_lines_are_read_or_skipped_and_counted(tmp_path):
    txt = tmp_path / "captions.txt"
    txt.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    assert generate.read_prompts_file(str(txt)) == ([(0, "a red circle"), (2, "a blue square")], {"empty_caption": 1})
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(['{"caption": "a red circle"}', '{"text": "a star"}', "{broken", '{"caption": 3}',
                                '{"caption": ""}', '[1, 2]']), encoding="utf-8")
    assert generate.read_prompts_file(str(jsonl)) == (
        [(0, "a red circle"), (1, "a star")], {"malformed_json": 2, "caption_not_a_string": 1, "empty_caption": 1})
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un cercle rouge \u00e0 gauche".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        generate.read_prompts_file(str(latin))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no caption"):
        generate.read_prompts_file(str(empty))


def test_prompts_file_lines_end_at_newlines_only(tmp_path):
    # a form feed or U+2028 inside a caption is no line break: index i stays line i (and the caption
    # reads as ingestion stores it, that whitespace one space)
    txt = tmp_path / "captions.txt"
    txt.write_bytes("a red\x0ccircle\r\na blue square\n".encode("utf-8"))
    assert generate.read_prompts_file(str(txt)) == ([(0, "a red circle"), (1, "a blue square")], {})
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(json.dumps({"caption": "a red\u2028circle"}, ensure_ascii=False) + "\n"
                     + json.dumps({"caption": "a star"}) + "\n", encoding="utf-8")
    assert generate.read_prompts_file(str(jsonl)) == ([(0, "a red circle"), (1, "a star")], {})


def _written(out):
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_generate_many_writes_every_sample_resumes_and_shards(generator, tmp_path):
    prompts = [(0, "a red circle"), (2, "a blue square"), (3, "a green triangle at the bottom")]
    kwargs = dict(num_samples=2, config=sampling.SamplingConfig(top_p=0.9, cfg_scale=3.0), seed=1)
    out = tmp_path / "many"
    summary = generate.generate_many(generator, prompts, str(out), {"seed": 1}, batch_size=3, **kwargs)
    assert summary["captions"] == 3 and summary["skipped_as_done"] == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 2, 3] and [r["caption"] for r in rows] == [c for _, c in prompts]
    assert all(r["files"] == [f"images/{r['index']:06d}_{k}.png" for k in range(2)] for r in rows)
    assert all(r["scores"][0] >= r["scores"][1] for r in rows)   # reranked: best first
    first = _written(out)
    assert len(first) == 6
    assert np.asarray(Image.open(out / "images" / "000003_1.png")).shape == (16, 16, 3)
    # an interrupted run (a sample missing): only that caption is drawn again, identically
    os.remove(out / "images" / "000002_1.png")
    again = generate.generate_many(generator, prompts, str(out), {"seed": 1}, batch_size=3, **kwargs)
    assert again["captions"] == 1 and again["skipped_as_done"] == 2 and _written(out) == first
    # resuming with other settings (e.g. a newer checkpoint) would mix two draws in one directory: refused
    with pytest.raises(ValueError, match=r"other settings \(seed: 1 -> 2\)"):
        generate.generate_many(generator, prompts, str(out), {"seed": 2, "batch_size": 3}, batch_size=3,
                               **{**kwargs, "seed": 2})
    # two shards (two processes), one caption a call: the same images
    sharded = tmp_path / "sharded"
    for shard in (0, 1):
        summary = generate.generate_many(generator, prompts, str(sharded), {}, batch_size=1, num_shards=2,
                                         shard_index=shard, **kwargs)
        assert summary["skipped_as_done"] == 0   # shard 0's captions are not shard 1's (it said 2)
    assert _written(sharded) == first
    assert sorted(p.name for p in sharded.glob("manifest*")) == ["manifest.0-of-2.jsonl", "manifest.1-of-2.jsonl"]
    with pytest.raises(ValueError, match="shard_index 2"):
        generate.generate_many(generator, prompts, str(sharded), {}, num_shards=2, shard_index=2, **kwargs)


def test_generate_many_refuses_to_resume_over_an_edited_prompts_file(generator, tmp_path):
    out = str(tmp_path / "many")
    kwargs = dict(batch_size=2, num_samples=1, rerank=False)
    generate.generate_many(generator, [(0, "a red circle"), (1, "a star")], out, {}, **kwargs)
    # line 1 edited: its samples there show "a star", and were kept as done
    with pytest.raises(ValueError, match=r"other captions for 1 lines \(line indices \[1\], e.g. 'a star'\)"):
        generate.generate_many(generator, [(0, "a red circle"), (1, "a blue square")], out, {}, **kwargs)
    assert generate.generate_many(generator, [(0, "a red circle"), (1, "a star")], out, {}, **kwargs)["captions"] == 0


def test_generate_many_resumes_after_a_manifest_line_cut_by_a_kill(generator, tmp_path):
    from cm3leon_jax import clip_metrics
    out = tmp_path / "many"
    kwargs = dict(batch_size=2, num_samples=1, rerank=False)
    prompts = [(0, "a red circle"), (1, "a star")]
    generate.generate_many(generator, prompts, str(out), {}, **kwargs)
    manifest = out / "manifest.jsonl"
    manifest.write_text(manifest.read_text()[:-20])   # killed while writing the second line
    again = generate.generate_many(generator, prompts, str(out), {}, **kwargs)   # was a JSONDecodeError
    assert again["captions"] == 1 and again["skipped_as_done"] == 1
    assert [(r["index"], r["caption"]) for r in clip_metrics.read_manifests(str(out))] == prompts


def test_generate_many_refuses_captions_too_long_for_the_model_before_drawing(generator, tmp_path):
    # one such caption failed its whole call mid-run, and every rerun at the same place
    prompts = [(0, "a red circle"), (1, "a blue square " * 200), (2, "a star")]
    with pytest.raises(ValueError, match=r"1 captions \(line indices \[1\]\)"):
        generate.generate_many(generator, prompts, str(tmp_path / "many"), {}, batch_size=1, num_samples=1,
                               rerank=False)
    assert not list((tmp_path / "many" / "images").glob("*.png"))


def test_retrieval_augmented_prompt_prepends_bank_documents(generator):
    neighbours = generator.retrieve("a small red circle at the top left", 2)
    assert 1 <= len(neighbours) <= 2
    prompt = generator.image_prompt("a red circle", neighbours)
    assert prompt[0] == generator.vocab.eos_id and prompt[-1] == generator.vocab.break_id
    assert len(prompt) == 2 + sum(len(n) for n in neighbours) + len(generator.vocab.encode_text("a red circle"))
    out = generator.text_to_image(["a red circle"], num_samples=2, num_neighbours=2, rerank=False)
    assert out[0].codes.shape == (2, 4, 4) and out[0].scores is None


def test_image_to_text_with_documents_retrieved_by_the_image(generator):
    from cm3leon_jax import retriever
    from data_pipeline import neighbours
    image = np.zeros((16, 16, 3), np.uint8)
    image[2:8, 2:8] = (220, 30, 30)
    codes = generator.vq.encode(image[None])[0]
    docs = generator.retrieve_for_image(codes, 2)
    assert 1 <= len(docs) <= 2
    # the query is the image's own embedding, searched under the training pipeline's rules
    index, documents, bank, multimodal, _ = generator._retrieval
    params, rcfg = generator.retriever
    ids, _ = neighbours.neighbours_of_queries(index, retriever.embed_images(params, rcfg, [codes.reshape(-1)]), 2,
                                              bank, multimodal)
    expected = [np.asarray(documents[int(i)]["tokens"]) for i in ids[0] if i >= 0]
    assert len(docs) == len(expected) and all(np.array_equal(a, b) for a, b in zip(docs, expected))
    prompt = generator.caption_prompt(codes, docs)
    body = sum(len(d) for d in docs)
    assert prompt[0] == generator.vocab.eos_id and prompt[1:1 + body] == [int(t) for d in docs for t in d]
    assert prompt[1 + body:3 + body] == [generator.vocab.sentinel(0), generator.vocab.break_id]
    assert len(prompt) == 1 + body + 2 + codes.size + 1
    [caption] = generator.image_to_text(image[None], max_tokens=6, num_neighbours=2)
    assert isinstance(caption, str)



class _CliFlags(types.SimpleNamespace):
    """absl's FLAGS as `_run` reads them: attributes, and `flags[name].present` for those in `given`."""

    def __getitem__(self, name):
        return types.SimpleNamespace(present=name in getattr(self, "given", ()))


def test_cli_image_to_text_retrieves_the_neighbours_asked_for(generator, tmp_path, monkeypatch):
    # `generate --image x.png --neighbours 2` recorded neighbours=2 but captioned without retrieval
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    calls = []
    monkeypatch.setattr(generator, "image_to_text", lambda images, **kw: calls.append(kw) or ["a caption"])
    flags = _CliFlags(
        temperature=0.0, top_k=0, top_p=1.0, cfg_scale=1.0, cd_k=0, cd_alpha=0.1, cd_fraction=0.0, num_samples=1,
        neighbours=2, seed=0, workdir=str(tmp_path), rerank=False, out=str(tmp_path / "out"), prompts_file=None,
        prompt=[], image=[str(tmp_path / "x.png")], task=None, interleaved=False, question=None, max_text_tokens=4)
    generate._run(generator, flags)
    assert calls[0]["num_neighbours"] == 2
    recorded = json.loads((tmp_path / "out" / "captions.json").read_text())["settings"]
    assert recorded["neighbours"] == 2 and "cfg_scale" not in recorded  # one stream: no guidance to record
    generate._run(generator, _CliFlags(**{**vars(flags), "question": "what colour is it?"}))
    assert json.loads((tmp_path / "out" / "captions.json").read_text())["question"] == "what colour is it?"
    # a --prompt beside --image was dropped without a word
    with pytest.raises(ValueError, match="--image captions images"):
        generate._run(generator, types.SimpleNamespace(**{**vars(flags), "prompt": ["a red circle"]}))
    # paths that retrieve nothing refuse --neighbours instead of recording it
    for other in (dict(image=[], prompt=["a <mask:0> circle"]), dict(image=[], prompt=["a circle"], interleaved=True)):
        with pytest.raises(ValueError, match="--neighbours applies to"):
            generate._run(generator, types.SimpleNamespace(**{**vars(flags), **other}))
    # infilling and text -> image prompts mixed: the infilling one was drawn as a caption, <mask:0> and all
    with pytest.raises(ValueError, match="either every prompt infills"):
        generate._run(generator, types.SimpleNamespace(**{**vars(flags), "image": [], "neighbours": 0,
                                                          "prompt": ["a red circle", "a <mask:0> square"]}))
    # one-stream text decodes: guidance, CD-K and sample counts given on the command line were ignored
    infill = dict(image=[], neighbours=0, prompt=["a <mask:0> circle"])
    for path, what in ((dict(), "image -> text"), (infill, "text infilling")):
        for given in (("cfg_scale",), ("cd_k", "num_samples"), ("cd_fraction",), ("cd_alpha",)):
            with pytest.raises(ValueError, match=f"{what} decodes one text per prompt.*--{given[0]}"):
                generate._run(generator, _CliFlags(**{**vars(flags), **path, "given": given}))


def _prompts_file_runs(generator, tmp_path, monkeypatch, *flag_sets):
    """`generate --prompts_file` CLI runs (generate._run), one per dict of flags over defaults; returns
    each run's (settings, keyword arguments) as handed to generate_many, which draws nothing here."""
    import types
    (tmp_path / "captions.txt").write_text("a red circle\n", encoding="utf-8")
    seen = []
    monkeypatch.setattr(generate, "generate_many", lambda gen, prompts, out, settings, **kw: seen.append((settings, kw)))
    defaults = dict(
        temperature=1.0, top_k=0, top_p=0.9, cfg_scale=3.0, cd_k=0, cd_alpha=0.1, cd_fraction=0.0, num_samples=1,
        neighbours=0, seed=0, workdir=str(tmp_path), rerank=False, out=str(tmp_path / "out"),
        prompts_file=str(tmp_path / "captions.txt"), prompt=[], image=[], task=None, interleaved=False, question=None,
        batch_size=4, num_shards=1, shard_index=0)
    for flags in flag_sets:
        generate._run(generator, types.SimpleNamespace(**{**defaults, **flags}))
    return seen


def test_cli_records_every_setting_that_changes_the_images(generator, tmp_path, monkeypatch):
    # a --prompts_file run resumed with --int8, another --compute_dtype or --vq_workdir mixed two draws in one
    # directory: none of them was in the settings a resume compares
    (settings, _), = _prompts_file_runs(generator, tmp_path, monkeypatch, {})
    assert {k: settings[k] for k in ("int8", "compute_dtype", "vq_workdir")} == {
        "int8": False, "compute_dtype": generator.model_config.dtype, "vq_workdir": os.path.abspath(generator.vq_workdir)}
    assert settings["data_dir"] == os.path.abspath(generator.data_dir)


def test_cli_cd_k_alone_draws_as_the_cd_k_share_does(generator, tmp_path, monkeypatch):
    # `--cd_k 2` alone applied --top_p/--top_k to the CD-K scores; `--cd_k 2 --cd_fraction 1` (and evaluate's
    # cdk row) did not: the same flag drew two ways
    cd_k_flags = dict(top_k=5, cd_k=2, cd_alpha=0.2, num_samples=2)
    (_, alone), (_, share) = _prompts_file_runs(generator, tmp_path, monkeypatch, cd_k_flags,
                                                dict(cd_k_flags, cd_fraction=1.0))
    cd_k = sampling.SamplingConfig(temperature=1.0, cd_k=2, cd_alpha=0.2)
    assert alone["config"] == cd_k and share["cd_config"] == cd_k and share["cd_fraction"] == 1.0


def test_prompts_take_text_as_ingestion_stored_it(generator, tmp_path, monkeypatch):
    # captions were tokenized as typed: " a  red\ncircle" gave pieces training never saw (ingestion stores
    # whitespace runs as one space), and "<break>" in one became the control token
    class Stop(Exception):
        pass

    seen = []
    monkeypatch.setattr(generator, "image_prompt", lambda caption, docs=(): seen.append(caption) or (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        generator.text_to_image([" a  red\ncircle\ufeff"], num_samples=1, rerank=False)
    assert seen == ["a red circle"]
    with pytest.raises(ValueError, match="caption 1 'a <break> circle' spells a special token"):
        generator.text_to_image(["a circle", "a <break> circle"], num_samples=1, rerank=False)
    with pytest.raises(ValueError, match="caption 0 'a\\\\x00b' holds a NUL byte"):
        generator.text_to_image(["a\x00b"], num_samples=1, rerank=False)
    path = tmp_path / "captions.txt"
    path.write_text("a  red\tcircle\nthe <eos> end\n \ufeff\na\x00b\n", encoding="utf-8")
    assert generate.read_prompts_file(str(path)) == ([(0, "a red circle")], {
        "caption_has_special_tokens": 1, "empty_caption": 1, "caption_has_nul": 1})


def test_cli_refuses_a_question_without_an_image():
    # `--prompt "a red circle" --question "what colour?"` drew images for the prompt, the question unread
    import types
    flags = types.SimpleNamespace(question="what colour is it?", image=[], prompt=["a red circle"], prompts_file=None,
                                  task=None, interleaved=False)
    with pytest.raises(ValueError, match="--question asks about --image"):
        generate._run(None, flags)
    # `--task edit --interleaved` ran the edit and dropped --interleaved without a word
    flags = types.SimpleNamespace(question=None, image=["x.png"], prompt=["make it blue"], prompts_file=None,
                                  task="edit", interleaved=True)
    with pytest.raises(ValueError, match="--task edit is another command"):
        generate._run(None, flags)


def test_sft_cli_takes_cd_k_for_image_tasks_and_refuses_guidance_for_text_tasks(generator, tmp_path, monkeypatch):
    # `generate --task edit --cd_k 1` drew without CD-K (the flag was never read); `--task vqa --cfg_scale 3`
    # recorded a guidance scale that one-stream text decoding never applies
    import types
    from cm3leon_jax import sft_generate
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    given = {"cd_k": 1, "cd_alpha": 0.2}

    class Flags(types.SimpleNamespace):
        def __getitem__(self, name):
            return types.SimpleNamespace(present=name in given)

    calls = []
    monkeypatch.setattr(sft_generate.TaskGenerator, "run", lambda self, task, examples, config, **kw:
                        calls.append(config) or [np.zeros((16, 16, 3), np.uint8)] * len(examples))
    flags = Flags(task="edit", image=[str(tmp_path / "x.png")], prompt=["make it blue"], question=None,
                  control_type=None, temperature=1.0, top_k=0, top_p=0.9, cfg_scale=3.0, image_cfg_scale=1.5,
                  out=str(tmp_path / "out"), workdir=str(tmp_path), num_samples=1, seed=0, max_text_tokens=4, **given)
    sft_generate.run_cli(generator, flags)
    assert (calls[0].cd_k, calls[0].cd_alpha, calls[0].cfg_scale) == (1, 0.2, 7.5)
    given = {"cfg_scale": 3.0}
    with pytest.raises(ValueError, match="--task vqa writes text.*--cfg_scale"):
        sft_generate.run_cli(generator, Flags(**{**vars(flags), "task": "vqa", "question": "what?"}))

def test_image_to_text_and_infilling_write_text_only(generator):
    images = np.stack([np.full((16, 16, 3), 200, np.uint8), np.zeros((16, 16, 3), np.uint8)])
    captions = generator.image_to_text(images, max_tokens=6)
    answers = generator.image_to_text(images, question="what colour is the shape?", max_tokens=6)
    assert len(captions) == len(answers) == 2 and all(isinstance(c, str) for c in captions + answers)
    filled = generator.infill_text("a <mask:0> circle at the top left", max_tokens=6)
    assert isinstance(filled, str) and "<" not in filled


def test_image_to_text_refuses_unbatched_inputs_and_bad_lengths_up_front(generator):
    # one [16, 16, 3] image used to be encoded to [4, 4] codes and captioned as 4 "images" of 4 codes each
    with pytest.raises(ValueError, match=r"batch of images \[N, H, W, 3\].*image\[None\]"):
        generator.image_to_text(np.zeros((16, 16, 3), np.uint8), max_tokens=4)
    codes = np.zeros((2, 4, 4), np.int32)
    with pytest.raises(ValueError, match=r"code grids \[N, 4, 4\]"):
        generator.caption_codes(codes[0], [[]] * 4)
    with pytest.raises(ValueError, match="1 lists of documents for 2 images"):   # zip dropped the second image
        generator.caption_codes(codes, [[]])
    assert generator.image_to_text(np.zeros((0, 16, 16, 3), np.uint8)) == []   # was "every prompt needs a token"
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):   # was a TypeError from XLA
        generator.infill_text("a <mask:0> circle", max_tokens=0)


def _check_interleaved_layout(vocab, out):
    """The training layout: `prompt <break> image <break> text ...`, never two images in a row, every
    image exactly one grid of image ids between <break>s, nothing else but text ids."""
    parts, tokens = out["parts"], np.asarray(out["tokens"])
    assert tokens[0] == vocab.eos_id and isinstance(parts[0], str)
    kinds = ["text" if isinstance(p, str) else "image" for p in parts]
    assert "image image" not in " ".join(kinds)
    images = [p for p in parts if not isinstance(p, str)]
    for codes in images:
        assert codes.shape == tuple(vocab.image_grid) and 0 <= codes.min() and codes.max() < vocab.num_image_codes
    assert out["images"].shape == (len(images), 16, 16, 3)
    body = tokens[1:]
    assert int(np.sum(vocab.is_image(body))) == len(images) * vocab.image_tokens_per_image
    assert int(np.sum(body == vocab.break_id)) == 2 * len(images)
    assert not np.isin(body, [vocab.eos_id, vocab.eoss_id, vocab.mask_id]).any()
    return kinds


def test_interleaved_generation_writes_text_and_images_in_the_training_layout(generator):
    v = generator.vocab
    prompts = ["a small red circle at the top left", "a blue square"]
    kwargs = dict(num_samples=3, max_images=2, max_text_tokens=6, text_config=sampling.SamplingConfig(temperature=1.0),
                  seed=3)
    documents = generator.interleaved(prompts, **kwargs)
    assert [d["prompt"] for d in documents] == [prompts[0]] * 3 + [prompts[1]] * 3
    for doc in documents:
        kinds = _check_interleaved_layout(v, doc)
        assert kinds[:2] == ["text", "image"] and kinds.count("image") <= 2   # image_first: the prompt's image
    assert len({tuple(d["tokens"]) for d in documents}) > 2   # samples differ
    again = generator.interleaved(prompts, **kwargs)
    assert [d["tokens"] for d in again] == [d["tokens"] for d in documents]
    # drawn 4 documents a call (`generate --interleaved --batch_size`: all 6 at once before), the same documents
    batched = generator.interleaved(prompts, batch_size=4, **kwargs)
    assert [d["tokens"] for d in batched] == [d["tokens"] for d in documents]
    with pytest.raises(ValueError, match="batch_size >= 1"):
        generator.interleaved(prompts, batch_size=0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generator.interleaved(["  "])
    with pytest.raises(TypeError, match="list of prompts"):
        generator.interleaved("a circle")
    # guidance and CD-K need an unconditional stream that a mid-document image has not: they were dropped unread
    for bad in (dict(image_config=sampling.SamplingConfig(cfg_scale=3.0)),
                dict(image_config=sampling.SamplingConfig(cd_k=2)),
                dict(text_config=sampling.SamplingConfig(temperature=0.0, cfg_scale=2.0))):
        with pytest.raises(ValueError, match=f"without guidance or CD-K: {next(iter(bad))}"):
            generator.interleaved(prompts, **bad)


def test_interleaved_documents_drawn_together_equal_those_drawn_alone(generator):
    # greedy text and images: left padding and batching change nothing, with or without the image first
    greedy = sampling.SamplingConfig(temperature=0.0)
    prompts = ["a circle", "a large green triangle at the bottom right"]
    for image_first in (True, False):
        kwargs = dict(max_images=2, max_text_tokens=5, text_config=greedy, image_config=greedy, image_first=image_first)
        together = generator.interleaved(prompts, **kwargs)
        for prompt, doc in zip(prompts, together):
            _check_interleaved_layout(generator.vocab, doc)
            assert generator.interleaved([prompt], **kwargs)[0]["tokens"] == doc["tokens"]
        if not image_first:
            assert all(isinstance(d["parts"][0], str) for d in together)


def test_cli_interleaved_refuses_guidance_flags_and_records_none(generator, tmp_path, monkeypatch):
    # `--interleaved --cfg_scale 5 --cd_k 3` drew without guidance or CD-K (image_config reset them), and
    # interleaved.json recorded cfg_scale 5, cd_k 3 and a reranker as the settings used
    seen = []
    monkeypatch.setattr(generate, "write_interleaved",
                        lambda gen, prompts, out, settings, **kw: seen.append(settings) or seen.append(kw))
    flags = _CliFlags(
        temperature=1.0, top_k=0, top_p=0.9, cfg_scale=3.0, cd_k=0, cd_alpha=0.1, cd_fraction=0.0, num_samples=2,
        neighbours=0, seed=0, workdir=str(tmp_path), rerank=True, out=str(tmp_path / "out"), prompts_file=None,
        prompt=["a red circle"], image=[], task=None, interleaved=True, question=None, max_text_tokens=4, max_images=1,
        batch_size=3)
    for given in (("cfg_scale",), ("cd_k",), ("cd_fraction",), ("cd_alpha",)):
        with pytest.raises(ValueError, match=f"--interleaved draws without guidance or CD-K: --{given[0]}"):
            generate._run(generator, _CliFlags(**{**vars(flags), "given": given}))
    generate._run(generator, _CliFlags(**{**vars(flags), "given": ("num_samples",)}))
    assert seen[0]["num_samples"] == 2 and not {"cfg_scale", "cd_k", "cd_alpha", "cd_fraction", "reranker"} & set(seen[0])
    assert seen[1]["batch_size"] == 3   # --batch_size was not passed on: every document in one call


def test_write_interleaved_leaves_no_earlier_grid_beside_documents_without_images(tmp_path):
    # a rerun into the same --out whose documents hold no image (--max_images 0) kept the earlier
    # interleaved.png, showing images of documents no longer there
    doc = lambda n: {"prompt": "p", "parts": ["p", *[np.zeros((2, 2), np.int32)] * n],  # noqa: E731
                     "images": np.zeros((n, 8, 8, 3), np.uint8), "tokens": []}
    for n, written in ((1, "interleaved.png"), (0, "interleaved.json")):
        gen = types.SimpleNamespace(interleaved=lambda prompts, **kw: [doc(n)])
        assert generate.write_interleaved(gen, ["p"], str(tmp_path), {}) == str(tmp_path / written)
    assert sorted(os.listdir(tmp_path)) == ["interleaved.json"]


def test_cli_writes_an_interleaved_document(tiny_pipeline, tmp_path):
    out = tmp_path / "gen"
    proc = run_cli("cm3leon_jax.generate", "--workdir", tiny_pipeline["lm"], "--prompt", "a small red circle",
                   "--interleaved", "--num_samples", "2", "--max_images", "2", "--max_text_tokens", "6", "--out", out)
    record = json.loads((out / "interleaved.json").read_text())
    assert len(record["documents"]) == 2
    widths = []
    for doc in record["documents"]:
        assert doc["prompt"] == "a small red circle" and doc["parts"][0] == {"text": "a small red circle"}
        images = [p for p in doc["parts"] if "image" in p]
        assert [p["image"] for p in images] == list(range(len(images))) and 1 <= len(images) <= 2
        widths.append(len(images))
    grid = np.asarray(Image.open(out / "interleaved.png"))   # one row per document
    assert grid.shape == (2 * 18 + 2, max(widths) * 18 + 2, 3)
    assert "[image 0]" in proc.stdout


def test_cli_writes_a_png_grid_and_the_settings(tiny_pipeline, tmp_path):
    out = tmp_path / "gen"
    run_cli("cm3leon_jax.generate", "--workdir", tiny_pipeline["lm"], "--prompt", "a small red circle", "--prompt",
            "a large green star", "--num_samples", "3", "--cfg_scale", "2", "--cd_fraction", "0.34", "--out", out)
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    record = json.loads((out / "samples.json").read_text())
    assert record["settings"]["cfg_scale"] == 2.0 and len(record["samples"]) == 2
    assert len(record["samples"][0]["scores"]) == 3
    # one of the three samples by CD-K, and the record names the k that drew it
    assert sorted(record["samples"][0]["strategies"]) == ["cdk", "topp", "topp"]
    assert record["settings"]["cd_k"] == sampling.DEFAULT_CD_K


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
                    reason="needs the interop extra (torch, transformers)")
def test_a_user_clip_checkpoint_reranks_text_to_image(tiny_pipeline, tmp_path):
    from cm3leon_jax import clip_metrics
    from tests.clip_fixture import write_tiny_clip
    clip_dir = write_tiny_clip(str(tmp_path / "clip"))
    gen = generate.Generator(tiny_pipeline["lm"], clip_model=clip_dir)
    caption = "a small red circle at the top left"
    [sample] = gen.text_to_image([caption], num_samples=4, config=sampling.SamplingConfig(top_p=0.9), seed=3)
    scorer = clip_metrics.ClipScorer(clip_dir)
    want = (clip_metrics.l2_normalize(scorer.image_features(sample.images))
            @ clip_metrics.l2_normalize(scorer.text_features([caption]))[0])
    np.testing.assert_allclose(sample.scores, want, atol=1e-5)   # CLIP's cosine, not the retriever's
    assert np.all(np.diff(sample.scores) <= 1e-6)                 # best first
    with pytest.raises(ValueError, match="not a Hugging Face CLIP checkpoint"):
        generate.Generator(tiny_pipeline["lm"], clip_model=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
                    reason="needs the interop extra (torch, transformers)")
def test_a_user_clip_checkpoint_as_the_retriever(tiny_pipeline, tmp_path):
    """index --clip_model embeds the bank with CLIP by the paper's rule; generation then queries that CLIP."""
    import shutil
    from cm3leon_jax import clip_metrics, retriever, vocab as vocab_lib, vq_tokenizer
    from data_pipeline import index as index_lib, neighbours, prepare
    from tests.clip_fixture import write_tiny_clip
    clip_dir = write_tiny_clip(str(tmp_path / "clip"))
    data = str(tmp_path / "data")
    shutil.copytree(tiny_pipeline["data"], data)
    shutil.rmtree(os.path.join(data, "retriever"))  # a user who never trained ours
    stats = index_lib.build(data, clip_model=clip_dir)
    assert stats["documents_with_full_neighbours"] > 0
    reference = retriever.load_clip_reference(data)
    assert reference["clip_model"] == os.path.abspath(clip_dir)

    # the stored bank is CLIP's caption and image embeddings, normalised, averaged, normalised
    docs = prepare.load_documents(data, "train")
    vocab = vocab_lib.Vocabulary.load(os.path.join(data, prepare.VOCAB_DIR))
    vq = vq_tokenizer.VQTokenizer.from_workdir(tiny_pipeline["vq"])
    scorer = clip_metrics.ClipScorer(clip_dir)
    first = [docs[i] for i in range(3)]
    text = clip_metrics.l2_normalize(scorer.text_features([vocab.decode_text(np.asarray(d["text_ids"])) for d in first]))
    codes = np.stack([np.asarray(d["image_codes"]).reshape(vocab.image_grid) for d in first])
    image = clip_metrics.l2_normalize(scorer.image_features(vq.decode(codes)))
    bank = np.load(reference["embeddings"])
    np.testing.assert_allclose(bank[:3], clip_metrics.l2_normalize(text + image), atol=1e-4)

    gen = generate.Generator(tiny_pipeline["lm"], data_dir=data)
    assert gen.retriever is None and gen.can_retrieve and gen.clip_scorer is not None
    caption = "a small red circle at the top left"
    got = gen.retrieve(caption, 2)
    query = clip_metrics.l2_normalize(scorer.text_features([caption])).astype(np.float32)
    multimodal = np.array([len(docs[i]["text_ids"]) > 0 and len(docs[i]["image_codes"]) > 0 for i in range(len(docs))])
    ids, _ = neighbours.neighbours_of_queries(neighbours.load_index(os.path.join(data, "scann_index")), query, 2, bank,
                                              multimodal)
    want = [np.asarray(docs[int(i)]["tokens"], np.int32) for i in ids[0] if i >= 0]
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, want))
    [sample] = gen.text_to_image([caption], num_samples=2, config=sampling.SamplingConfig(top_p=0.9),
                                 num_neighbours=1)
    assert sample.scores is not None and sample.images.shape[0] == 2   # reranked by the data's CLIP


def test_generation_queries_the_bank_the_way_its_last_index_build_embedded_it(tiny_pipeline, tmp_path):
    """A CLIP reference left by an earlier `--clip_model` build is not used once the index is rebuilt
    with the retriever; an index of a user's `--embeddings` has no query encoder: no retrieval."""
    import shutil
    from cm3leon_jax import retriever
    from data_pipeline import index as index_lib, neighbours
    data = str(tmp_path / "data")
    shutil.copytree(tiny_pipeline["data"], data)
    retriever.save_clip_reference(data, str(tmp_path / "removed_clip"), np.zeros((96, 8), np.float32))
    index_lib.build(data)
    assert neighbours.index_embedder(data) == {"kind": "retriever"}
    gen = generate.Generator(tiny_pipeline["lm"], data_dir=data)   # the stale reference names no checkpoint
    caption = "a small red circle at the top left"
    assert gen.clip_scorer is None and gen.can_retrieve and len(gen.retrieve(caption, 2)) == 2
    np.save(tmp_path / "mine.npy", np.random.default_rng(0).standard_normal((96, 16)).astype(np.float32))
    index_lib.build(data, embeddings_path=str(tmp_path / "mine.npy"))
    assert neighbours.index_embedder(data) == {"kind": "embeddings", "path": str(tmp_path / "mine.npy")}
    gen = generate.Generator(tiny_pipeline["lm"], data_dir=data)
    assert not gen.can_retrieve
    with pytest.raises(ValueError, match="built from --embeddings, which come with no query encoder"):
        gen.retrieve(caption, 2)

def test_int8_bfloat16_generator_decodes_and_bad_dtypes_are_refused(tiny_pipeline, generator):
    """Both precision options in one Generator (each alone is tested on the model in test_quantization)."""
    import jax.numpy as jnp
    from cm3leon_jax import quantization
    low = generate.Generator(tiny_pipeline["lm"], int8=True, compute_dtype="bfloat16")
    assert low.model_config.compute_dtype == jnp.bfloat16
    kernels = [x for x in jax.tree_util.tree_leaves(low.params, is_leaf=lambda x: isinstance(x, quantization.Int8Kernel))
               if isinstance(x, quantization.Int8Kernel)]
    assert kernels and all(k.values.dtype == np.int8 for k in kernels)
    assert quantization.weight_bytes(low.params) < quantization.weight_bytes(generator.params)
    samples = low.text_to_image(["a small red circle at the top left"], num_samples=2, rerank=False, seed=0)
    codes = samples[0].codes
    assert codes.shape == (2, 4, 4) and codes.min() >= 0 and codes.max() < low.vocab.num_image_codes
    assert isinstance(low.image_to_text(samples[0].images[:1])[0], str)
    with pytest.raises(ValueError, match="compute_dtype"):
        generate.Generator(tiny_pipeline["lm"], compute_dtype="int4")


def test_cli_draws_a_prompts_file(tiny_pipeline, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a small red circle\n\na large blue square\n", encoding="utf-8")
    out = tmp_path / "gen"
    proc = run_cli("cm3leon_jax.generate", "--workdir", tiny_pipeline["lm"], "--prompts_file", captions,
                   "--num_samples", "1", "--batch_size", "4", "--out", out)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["captions"] == 2
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000_0.png", "000002_0.png"]
    assert json.loads((out / "settings.json").read_text())["skipped_lines"] == {"empty_caption": 1}


def test_a_vq_tokenizer_with_another_codebook_is_refused(tiny_pipeline, monkeypatch):
    """Only the codes per image were compared: a VQ of a bigger codebook (the same grid) decoded every
    image with the wrong codes, silently."""
    from cm3leon_jax import export
    real = export.load_vq_tokenizer

    def bigger_codebook(*args, **kwargs):
        vq, source = real(*args, **kwargs)
        vq.config = dataclasses.replace(vq.config, codebook_size=vq.config.codebook_size * 2)
        return vq, source
    monkeypatch.setattr(export, "load_vq_tokenizer", bigger_codebook)
    with pytest.raises(ValueError, match=r"codes per image from \d+; the vocabulary expects \d+ from"):
        generate.Generator(tiny_pipeline["lm"])


def test_cli_refuses_max_images_without_interleaved(tmp_path):
    # `--max_images 2` without --interleaved was read by nothing: refused before the model loads
    import subprocess
    import sys
    from tests.helpers import REPO, cli_env
    proc = subprocess.run([sys.executable, "-m", "cm3leon_jax.generate", "--workdir", str(tmp_path / "none"),
                           "--prompt", "a red circle", "--max_images", "2"], cwd=REPO, capture_output=True, text=True,
                          env=cli_env(1), timeout=300)
    assert proc.returncode != 0 and "--max_images caps the images of an --interleaved document" in proc.stderr


def test_reranking_embeds_every_captions_samples_in_one_padded_call(monkeypatch):
    """Each retriever call pads its rows to embed_batch_size: per caption, 8 samples cost 256 rows."""
    from cm3leon_jax import retriever
    from cm3leon_jax.generate import Generator
    rcfg = retriever.retriever_config(text_vocab_size=64, num_image_codes=16, image_grid=(4, 4), max_text_len=8,
                                      width=32, embed_dim=16, num_heads=2, embed_batch_size=32)
    gen = Generator.__new__(Generator)
    gen.clip_scorer, gen._retriever = None, (retriever.init_params(rcfg), rcfg)
    gen.vocab = type("Vocab", (), {"encode_text": staticmethod(lambda c: np.array([ord(x) % 64 for x in c], np.int32))})
    rng = np.random.default_rng(0)
    captions, codes = ["a red circle", "two blue squares"], [rng.integers(0, 16, (3, 4, 4)) for _ in range(2)]
    alone = [gen.rerank_scores(c, g) for c, g in zip(captions, codes)]
    calls = []
    embed = retriever.embed_images
    monkeypatch.setattr(retriever, "embed_images", lambda *a, **k: calls.append(1) or embed(*a, **k))
    together = gen.rerank_scores_many(captions, codes, [None, None])
    assert len(calls) == 1
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)   # the same numbers as caption by caption


def test_text_to_image_decodes_every_captions_images_in_one_vq_call(generator, monkeypatch):
    """Each VQ decode call pads to its batch_size (64 images): caption by caption, 8 samples cost 64."""
    calls, decode = [], generator.vq.decode
    monkeypatch.setattr(generator.vq, "decode", lambda codes: calls.append(len(codes)) or decode(codes))
    samples = generator.text_to_image(["a red circle", "a blue square"], num_samples=2, rerank=False, seed=3)
    assert calls == [4]
    for s in samples:   # each caption's images are its own codes' (the same pixels as decoded alone)
        np.testing.assert_array_equal(s.images, decode(s.codes))
