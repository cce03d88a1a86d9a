"""Instruction tuning: templates, loss mask, mixing, ingestion, init_from, a minuscule SFT run on every
task with its evaluation, and the generate CLI's --task."""
import json
import os

import grain
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import data_pipeline
from cm3leon_jax import checkpointing, export, generate, lora, sampling, sharding, sft_eval, sft_generate, trainer
from cm3leon_jax import vocab as vocab_lib
from data_pipeline import cm3, prepare, sft_pipeline, sft_prepare, sft_tasks
from tests import pipeline_fixture
from tests.helpers import run_cli

IMAGE_SIZE = 16  # the fixture's VQ: 16x16 -> 4x4 codes


@pytest.fixture(scope="module")
def vocab(tiny_pipeline):
    return vocab_lib.Vocabulary.load(os.path.join(tiny_pipeline["data"], prepare.VOCAB_DIR))


def _coded(task, vocab, index, split="train"):
    """A shapes example with its images replaced by random VQ code grids (no VQ needed)."""
    ex = sft_tasks.shapes_example(task, split, index, image_size=IMAGE_SIZE)
    tmpl = sft_tasks.template(task)
    rng = np.random.default_rng(index)
    fields = {f: ex[f] for f in tmpl.text_fields}
    fields.update({f: rng.integers(0, vocab.num_image_codes, vocab.image_grid).astype(np.int32)
                   for f in tmpl.image_fields})
    return fields


@pytest.mark.parametrize("task", sft_tasks.TASKS)
def test_template_round_trips_and_prompt_is_the_sequence_prefix(task, vocab):
    tmpl = sft_tasks.template(task)
    for index in range(4):
        fields = _coded(task, vocab, index)
        seq = sft_tasks.encode_example(task, fields, vocab)
        assert seq.tokens[0] == vocab.eos_id and seq.tokens[-1] == vocab.eos_id
        back = sft_tasks.parse_sequence(task, seq.tokens, vocab)
        assert sorted(back) == sorted(fields)
        for f in tmpl.text_fields:
            assert back[f] == fields[f]
        for f in tmpl.image_fields:
            np.testing.assert_array_equal(back[f], fields[f])
        # the decoder's prompt is exactly the training sequence before the output
        assert sft_tasks.prompt_tokens(task, fields, vocab) == seq.tokens[:seq.output_start].tolist()
        out = seq.tokens[seq.output_start:]
        if tmpl.generates_image:
            assert vocab.is_image(out[:-2]).all() and len(out) == vocab.image_tokens_per_image + 2
        else:
            assert vocab.decode_text(out[:-1]) == tmpl.output.spec.format(**fields)
        # condition dropout on stored tokens == the guidance stream's prompt with the same slots dropped
        for drop in sft_generate.guidance_drops(tmpl, sampling.SamplingConfig(cfg_scale=3.0)):
            dropped = sft_tasks.drop_slots(seq, drop)
            assert dropped.tokens[:dropped.output_start].tolist() == sft_tasks.prompt_tokens(task, fields, vocab, drop)
            np.testing.assert_array_equal(dropped.tokens[dropped.output_start:], out)
    with pytest.raises(ValueError):
        other = "caption" if task != "caption" else "vqa"
        sft_tasks.parse_sequence(other, sft_tasks.encode_example(task, _coded(task, vocab, 0), vocab).tokens, vocab)


def test_unconditional_text_to_image_prompt_is_pretrainings():
    tmpl = sft_tasks.template("text_to_image")
    (drop,) = sft_generate.guidance_drops(tmpl, sampling.SamplingConfig(cfg_scale=3.0))
    assert sft_tasks.prompt_tokens("text_to_image", {"caption": "x"}, None, drop) == [
        vocab_lib.EOS_ID, vocab_lib.MASK_ID, vocab_lib.BREAK_ID]


def test_prompt_tokens_carry_zero_weight_and_cm3_switch(vocab):
    cfg = cm3.CM3Config.from_vocab(vocab, retrieval=False, condition_dropout_rate=0.0)
    for task in sft_tasks.TASKS:
        seq = sft_tasks.encode_example(task, _coded(task, vocab, 1), vocab)
        doc = {"task": task.encode(), "tokens": seq.tokens, "slots": seq.slots, "output_start": seq.output_start}
        out = sft_pipeline.SftTransform("output", 0.0, cfg)(doc, np.random.default_rng(0))
        np.testing.assert_array_equal(out["tokens"], seq.tokens)
        assert (out["weights"][:seq.output_start] == 0).all() and (out["weights"][seq.output_start:] == 1).all()
        # packed (shifted into next-token targets), the loss sees weight 1 exactly on the output's targets
        # (this check used to call a packing function that no longer exists, behind a hasattr: it never ran)
        row = next(data_pipeline.packing.PackedBatchIterator(
            grain.MapDataset.source([out]), seq_len=len(seq.tokens) - 1, global_batch_size=1, num_streams=1, seed=0,
            shuffle=False))
        np.testing.assert_array_equal(row["targets"][0], seq.tokens[1:])
        np.testing.assert_array_equal(row["weights"][0], np.arange(1, len(seq.tokens)) >= seq.output_start)
        full = sft_pipeline.SftTransform("cm3", 0.0, cfg)(doc, np.random.default_rng(3))
        sentinel = vocab.is_sentinel(full["tokens"])
        np.testing.assert_array_equal(full["weights"], np.where(sentinel, 0.0, 1.0))
        np.testing.assert_array_equal(cm3.cm3_unmask(full["tokens"], sentinels=cfg.sentinels), seq.tokens)
    with pytest.raises(ValueError, match="sft_loss"):
        sft_pipeline.SftTransform("prompt", 0.0, cfg)


def test_condition_dropout_frequencies():
    tmpl = sft_tasks.template("edit")
    rng = np.random.default_rng(0)
    drawn = [sft_tasks.choose_dropped(tmpl, rng, 0.1) for _ in range(6000)]
    text, image = tmpl.condition_slots("text"), tmpl.condition_slots("image")
    for option in (text, image, text + image):
        assert abs(drawn.count(option) / 6000 - 0.1) < 0.015
    assert sft_tasks.choose_dropped(sft_tasks.template("vqa"), rng, 0.3) == ()  # text outputs: no guidance


def test_mixing_counts_apply_the_papers_thresholds():
    sizes = {"edit": 1000, "vqa": 100, "caption": 400}
    assert sft_tasks.mixing_counts(sizes) == {"edit": 500, "vqa": 300, "caption": 500}  # vqa capped at 3x
    assert sft_tasks.mixing_counts(sizes, {"edit": 1, "vqa": 0, "caption": 0.01}) == {"edit": 1386, "vqa": 0,
                                                                                     "caption": 120}  # floor 0.3x
    assert sft_tasks.mixing_counts({"edit": 300, "vqa": 300}, {"edit": 2, "vqa": 1}) == {"edit": 400, "vqa": 200}
    assert sft_tasks.parse_weights("edit=2, vqa=0.5") == {"edit": 2.0, "vqa": 0.5}
    with pytest.raises(ValueError, match="TASK=WEIGHT"):
        sft_tasks.parse_weights("painting=1")
    with pytest.raises(ValueError, match="'edit' is given a weight more than once"):   # was: the last one, silently
        sft_tasks.parse_weights("edit=1,vqa=1,edit=3")
    for spec in ("edit=inf,vqa=1", "edit=1e400", "edit=nan", "edit=-1"):   # inf made every share NaN downstream
        with pytest.raises(ValueError, match=">= 0 and finite"):
            sft_tasks.parse_weights(spec)


def test_mixing_frequencies_match_the_weights_within_sampling_error():
    ranges = {"text_to_image": (0, 500), "edit": (500, 800), "vqa": (800, 1000)}
    weights = {"text_to_image": 1.0, "edit": 2.0, "vqa": 1.0}
    counts = sft_tasks.mixing_counts({t: b - a for t, (a, b) in ranges.items()}, weights)
    view = sft_pipeline.MixedTaskDocuments(list(range(1000)), ranges, counts)
    rng = np.random.default_rng(0)
    n = 20_000
    drawn = np.asarray([view[int(i)] for i in rng.integers(0, len(view), n)])
    total = sum(weights.values())
    for task, (a, b) in ranges.items():
        p = weights[task] / total
        freq = np.mean((drawn >= a) & (drawn < b))
        assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n), (task, freq, p)
    # a down-sampled task (text_to_image: 500 docs, 250 per epoch) reaches all its documents over epochs
    seen = {view[e * view.per_epoch + j] for e in range(2) for j in range(counts["text_to_image"])}
    assert seen == set(range(500))


@pytest.fixture(scope="module")
def sft_run(tiny_pipeline, tmp_path_factory):
    """SFT data of every task (16 px) and a 4-step SFT run initialised from the fixture's LM."""
    root = tmp_path_factory.mktemp("sft")
    cfg = pipeline_fixture.data_config("", tiny_pipeline["vq"])
    cfg.num_documents = ml_collections.ConfigDict({"train": 4, "validation": 1})
    cfg.update(tasks=",".join(sft_tasks.TASKS), vocab_dir=os.path.join(tiny_pipeline["data"], prepare.VOCAB_DIR),
               max_document_length=257)  # the fixture's 300-piece BPE makes long captions
    vocab, encode = sft_prepare.load_vocab_and_encoder(cfg)
    data = str(root / "data")
    report = sft_prepare.prepare_sft(cfg, data, vocab, encode)
    config = sft_config(tiny_pipeline, data, str(root / "sft"), eval_every_steps=2, eval_batches=1)
    trainer.train(config, str(root / "sft"))
    return {"data": data, "report": report, "sft": str(root / "sft"), "config": config, "root": root}


def sft_config(tiny_pipeline, data_dir, workdir, **overrides):
    c = pipeline_fixture.lm_config(data_dir, tiny_pipeline["vocab_size"], total_steps=4)
    c.data.update(source="sft", seq_len=256, num_neighbours=0)
    c.init_from = tiny_pipeline["lm"]
    for k, v in overrides.items():
        c[k] = v
    return c


def test_sft_ingestion_keeps_tasks_contiguous(sft_run):
    train = sft_run["report"]["splits"]["train"]
    assert train["kept"] == 4 * len(sft_tasks.TASKS) and not train["skipped"]
    assert train["tasks"] == {t: [4 * i, 4 * i + 4] for i, t in enumerate(sft_tasks.TASKS)}
    docs = sft_prepare.load_sft_documents(sft_run["data"], "train")
    vocab = vocab_lib.Vocabulary.load(os.path.join(sft_run["data"], prepare.VOCAB_DIR))
    for i in (0, 13, 27):
        d = docs[i]
        task = d["task"].decode() if isinstance(d["task"], bytes) else d["task"]
        assert task == sft_tasks.TASKS[i // 4]
        fields = sft_tasks.parse_sequence(task, d["tokens"], vocab)
        assert set(fields) == set(sft_tasks.template(task).text_fields + sft_tasks.template(task).image_fields)


def test_task_weights_that_leave_tasks_out_say_so(sft_run):
    from unittest import mock
    data_config = ml_collections.ConfigDict(sft_run["config"].data.to_dict())
    with mock.patch.object(sft_pipeline.logging, "warning") as warning:
        for spec in ("", ",".join(f"{t}=1" for t in sft_tasks.TASKS)):   # every task has a weight: quiet
            data_config.sft_task_weights = spec
            sft_pipeline.task_mixture(data_config, sft_run["data"])
        assert not warning.called
        data_config.sft_task_weights = "edit=2"   # reads like "up-weight edit", trains on edit alone
        _, counts = sft_pipeline.task_mixture(data_config, sft_run["data"])
        assert counts["edit"] > 0 and sum(counts.values()) == counts["edit"]
        assert warning.call_count == 1 and "left out of training" in warning.call_args[0][0]
        assert warning.call_args[0][2] == ", ".join(t for t in sft_tasks.TASKS if t != "edit")


def test_held_out_loss_scores_the_validation_split_without_condition_dropout(sft_run):
    config = ml_collections.ConfigDict(sft_run["config"].to_dict())
    config.data.sft_condition_dropout = 1 / 3
    docs, transform = sft_pipeline.heldout_source(config)
    validation = sft_prepare.load_sft_documents(sft_run["data"], "validation")
    assert len(docs) == len(validation) == len(sft_tasks.TASKS)   # as prepared: one a task, no mixing
    rng = np.random.default_rng(0)
    for i in range(len(docs)):   # every slot kept, though training drops one in three here
        np.testing.assert_array_equal(transform(docs[i], rng)["tokens"], validation[i]["tokens"])
    # the run logged it at steps 2 and 4 (7 documents, cycled to fill the 8 streams of a batch)
    with open(os.path.join(sft_run["sft"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    held_out = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in held_out] == [2, 4] and all(np.isfinite(r["eval_loss"]) for r in held_out)


def test_sft_jsonl_ingestion_counts_bad_lines(tiny_pipeline, tmp_path):
    from data_pipeline import shapes_world as sw
    ex = sft_tasks.shapes_example("edit", "train", 0, image_size=IMAGE_SIZE)
    Image.fromarray(ex["source"]).save(tmp_path / "a.png")
    Image.fromarray(ex["target"]).save(tmp_path / "b.png")
    lines = [{"task": "edit", "source": "a.png", "instruction": "make the circle blue", "target": "b.png"},
             {"task": "vqa", "image": "a.png", "question": "how many shapes are there?", "answer": "two"},
             {"task": "edit", "source": "a.png", "instruction": "", "target": "b.png"},
             {"task": "edit", "source": "missing.png", "instruction": "x", "target": "b.png"},
             {"task": "vqa", "image": "a.png", "question": "q"},
             {"task": "painting", "image": "a.png"}]
    with open(tmp_path / "tasks.jsonl", "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    cfg = pipeline_fixture.data_config("", tiny_pipeline["vq"])
    cfg.update(source="jsonl", jsonl=str(tmp_path / "tasks.jsonl"), validation_fraction=0.0,
               tasks=",".join(sft_tasks.TASKS), vocab_dir=os.path.join(tiny_pipeline["data"], prepare.VOCAB_DIR),
               max_document_length=200)
    vocab, encode = sft_prepare.load_vocab_and_encoder(cfg)
    report = sft_prepare.prepare_sft(cfg, str(tmp_path / "out"), vocab, encode)["splits"]["train"]
    assert report["kept"] == 2 and report["tasks"] == {"vqa": [0, 1], "edit": [1, 2]}
    assert report["skipped"] == {"empty_caption": 1, "missing_image": 1, "missing_field": 1, "unknown_task": 1,
                                 "bad_manifest_line": 1}
    # in 2 parts (each line, bad ones too, owned by one) and merged: the same documents, counts and task ranges
    from data_pipeline import ingest_parts
    for i in range(2):
        sft_prepare.prepare_sft(cfg, str(tmp_path / "parts"), vocab, encode, shard_index=i, num_shards=2)
    run_cli("data_pipeline.sft_prepare", "--out", str(tmp_path / "parts"), "--merge")
    with open(os.path.join(tmp_path / "parts", prepare.REPORT_FILE)) as f:
        assert json.load(f)["splits"]["train"] == json.loads(json.dumps(report))
    assert os.path.isdir(ingest_parts.part_dir(str(tmp_path / "parts"), 1, 2))   # kept without --remove_parts
    single, parts = (sft_prepare.load_sft_documents(str(tmp_path / d), "train") for d in ("out", "parts"))
    assert len(single) == len(parts) == 2
    for i in range(2):
        for key in single[i]:
            np.testing.assert_array_equal(np.asarray(single[i][key]), np.asarray(parts[i][key]))
    assert sw.CLASS_PALETTE.shape == (8, 3)


def _jsonl_sft(tmp_path, spm_model, rows, vocab=None, **cfg_fields):
    """sft_prepare on JSONL `rows` (images: "a.png", a shapes render) with a stand-in VQ (no training)
    and `vocab` (default: on `spm_model`, 16 codes): (report's splits, out dir)."""
    from experiments import data_sft_shapes
    from cm3leon_jax.text_tokenizer import TextTokenizer
    vocab = vocab or vocab_lib.Vocabulary(TextTokenizer(spm_model), 16, 16, num_sentinels=4)
    Image.fromarray(sft_tasks.shapes_example("vqa", "train", 0, image_size=IMAGE_SIZE)["image"]).save(tmp_path / "a.png")
    with open(tmp_path / "tasks.jsonl", "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    cfg = data_sft_shapes.get_config()
    cfg.update(image_size=IMAGE_SIZE, min_image_size=8, encode_batch_size=4, log_every=1000, decode_threads=1,
               source="jsonl", jsonl=str(tmp_path / "tasks.jsonl"), validation_fraction=0.0, max_document_length=200)
    cfg.update(cfg_fields)
    encode = lambda images: (np.asarray(images)[:, ::4, ::4, 0] % 16).astype(np.int32)
    return sft_prepare.prepare_sft(cfg, str(tmp_path / "out"), vocab, encode)["splits"], str(tmp_path / "out")


_VQA_ROW = {"task": "vqa", "image": "a.png", "question": "how many shapes are there?", "answer": "two"}


def test_sft_jsonl_text_that_is_not_unicode_is_skipped_not_fatal(tiny_spm_model, tmp_path):
    """JSON's "\\ud800" escape is valid JSON but a lone surrogate no tokenizer encodes: that line is
    skipped and counted, the ingestion goes on."""
    rows = [_VQA_ROW, dict(_VQA_ROW, question="bad \ud800 text"), dict(_VQA_ROW, answer="\udfff")]
    report = _jsonl_sft(tmp_path, tiny_spm_model, rows)[0]["train"]
    assert report["kept"] == 1 and report["skipped"] == {"caption_not_utf8": 2}


def test_sft_jsonl_text_an_hf_tokenizer_cannot_spell_is_skipped_not_fatal(tmp_path):
    """An imported checkpoint's tokenizer.json may normalise ("ﬁ" -> "fi"): such a text is skipped and
    counted, not the end of the ingestion."""
    pytest.importorskip("tokenizers")
    from cm3leon_jax import hf_interop, hf_text_tokenizer
    from tests import helpers
    data = json.loads(helpers.chameleon_tokenizer_json())
    data["normalizer"] = {"type": "NFKC"}
    tj = json.dumps(data)
    m = hf_interop.vocab_mapping(hf_text_tokenizer.HFTextTokenizer(tj.encode(), [0]).hf_vocab(), 310)
    lay = m["layout"]
    tok = hf_text_tokenizer.HFTextTokenizer(tj.encode(), m["ours_to_hf"][lay["text_offset"]:lay["image_offset"]])
    vocab = vocab_lib.Vocabulary(tok, lay["num_image_codes"], 16, lay["num_sentinels"])
    report = _jsonl_sft(tmp_path, None, [_VQA_ROW, dict(_VQA_ROW, answer="\ufb01ve")], vocab=vocab)[0]["train"]
    assert report["kept"] == 1 and report["skipped"] == {"text_not_encodable": 1}


def test_sft_jsonl_splits_by_row_content_so_a_repeated_row_is_in_one_split(tiny_spm_model, tmp_path):
    """As prepare's JSONL: the split is a hash of the row, not of its line number (which would put
    copies of one example in train and validation, and move rows when one is inserted)."""
    words = ("one", "three", "four", "five", "six", "seven", "eight", "nine")
    rows = [_VQA_ROW] * 6 + [dict(_VQA_ROW, answer=w) for w in words]
    _, out = _jsonl_sft(tmp_path, tiny_spm_model, rows, tasks="vqa", validation_fraction=0.5)
    lines = {}
    for split in ("train", "validation"):
        docs = sft_prepare.load_sft_documents(out, split)
        lines[split] = {int(json.loads(docs[i]["meta"])["source"].rsplit(":", 1)[1]) for i in range(len(docs))}
    assert lines["train"] | lines["validation"] == set(range(1, 15)) and lines["train"] and lines["validation"]
    assert set(range(1, 7)) <= lines["train"] or set(range(1, 7)) <= lines["validation"]


def test_a_task_named_twice_is_refused():
    """Named twice, a task's documents would be two id ranges, reported as one spanning the tasks between."""
    with pytest.raises(ValueError, match=r"names \['vqa'\] more than once"):
        sft_prepare.configured_tasks(ml_collections.ConfigDict({"tasks": "vqa,caption, vqa"}))
    assert sft_prepare.configured_tasks(ml_collections.ConfigDict({"tasks": "vqa,caption"})) == ("vqa", "caption")


def test_sft_eval_refuses_no_examples_up_front(tmp_path):
    with pytest.raises(ValueError, match="num_examples=0"):
        sft_eval.evaluate(str(tmp_path / "no_such_workdir"), num_examples=0)


def test_packing_keeps_examples_whole_and_counts_the_too_long(tiny_pipeline, sft_run):
    config = sft_config(tiny_pipeline, sft_run["data"], "", **{})
    config.data.update(seq_len=100, sft_condition_dropout=0.0)  # vqa, edit, segment fit (16 px); captions do not
    it = data_pipeline.make_train_iterator(config, 0, 1)
    batch = next(it)
    for row in range(batch["inputs"].shape[0]):
        for s in set(batch["segment_ids"][row].tolist()) - {0}:
            where = batch["segment_ids"][row] == s
            inputs, targets, weights = batch["inputs"][row][where], batch["targets"][row][where], batch["weights"][row][where]
            assert inputs[0] == vocab_lib.EOS_ID and targets[-1] == vocab_lib.EOS_ID  # a whole example
            assert weights[0] == 0 and weights[-1] == 1  # prompt first, output last
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
    assert it.skipped.get("document_longer_than_seq_len", 0) > 0


def test_init_from_loads_params_and_resets_the_optimizer(tiny_pipeline, sft_run, tmp_path):
    config = sft_config(tiny_pipeline, sft_run["data"], str(tmp_path))
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    ckpt = checkpointing.CheckpointManager(str(tmp_path), save_every_steps=100, keep=1, async_save=False)
    state = trainer.restore_or_init(ckpt, t, None, config, str(tmp_path))
    pretrained, step = checkpointing.restore_params(tiny_pipeline["lm"], t.abstract_state.params)
    assert int(state.step) == 0 and step == 4
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(pretrained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = t.init_state(int(config.seed)).opt_state
    for a, b in zip(jax.tree_util.tree_leaves(state.opt_state), jax.tree_util.tree_leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.load(open(tmp_path / "init_from.json"))["step"] == 4
    ckpt.close()
    # the SFT run resumes its own checkpoint, not init_from: its metrics end at step 4, params differ
    sft_params, sft_step = checkpointing.restore_params(sft_run["sft"], t.abstract_state.params)
    assert sft_step == 4
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(sft_params), jax.tree_util.tree_leaves(pretrained)))
    trainer.train(sft_config(tiny_pipeline, sft_run["data"], ""), sft_run["sft"])  # already at total_steps
    assert checkpointing.restore_params(sft_run["sft"], t.abstract_state.params)[1] == 4
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 999 .* holds steps \[.*4\]"):
        checkpointing.restore_params(sft_run["sft"], t.abstract_state.params, step=999)


def test_lora_fine_tuning_trains_adapters_only_and_is_merged_for_decoding_export_and_init_from(
        tiny_pipeline, sft_run, tmp_path):
    config = sft_config(tiny_pipeline, sft_run["data"], "")
    config.model.update(lora_rank=4, lora_alpha=8.0)
    config.optimizer.peak_lr = 1e-2
    run = str(tmp_path / "lora")
    last = trainer.train(config, run)
    assert np.isfinite(last["loss"]) and last["final_step"] == 4
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    # the checkpoint holds the adapters (and their Adam state) only: the frozen weights stay in init_from's
    import orbax.checkpoint as ocp
    from flax import traverse_util
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(run, "checkpoints", "4", "state"))
    meta = getattr(meta, "item_metadata", meta)
    saved_paths = set(traverse_util.flatten_dict(getattr(meta, "tree", meta)["params"]))
    assert saved_paths and all(p[-1] in lora.ADAPTER_PARAMS for p in saved_paths), sorted(saved_paths)[:5]
    params, step = trainer.restore_run_params(run, config, mesh)
    assert step == 4
    adapters, base = lora.split(params)
    pretrained, _ = checkpointing.restore_params(tiny_pipeline["lm"], lora.split(t.abstract_state.params)[1])
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(pretrained)):  # frozen, bit for bit
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree_util.tree_leaves(adapters))   # B moved off zero
    merged = jax.device_get(lora.merge_params(params, 4, 8.0))
    tokens = np.asarray(next(data_pipeline.make_train_iterator(config, 0, 1))["inputs"][:2])
    adapted_logits = t.model.apply({"params": params}, tokens)
    assert not np.allclose(adapted_logits, t.model.apply({"params": lora.join(jax.tree_util.tree_map(
        np.zeros_like, jax.device_get(adapters)), base)}, tokens), atol=1e-4)   # the adapters change the model
    # decoding loads the merged model: rank 0, the same logits
    gen = generate.Generator(run)
    assert gen.model_config.lora_rank == 0 and gen.config.model.lora_rank == 0
    np.testing.assert_allclose(gen.trainer.model.apply({"params": gen.params}, tokens), adapted_logits,
                               rtol=1e-4, atol=1e-5)
    # a params bundle holds the merged model and its rank-0 config
    bundle = str(tmp_path / "bundle")
    export.export(run, bundle, "params")
    bundle_config, bundle_params = export.load_bundle(bundle)
    assert bundle_config.model.lora_rank == 0 and bundle_config.model.d_model == config.model.d_model
    for a, b in zip(jax.tree_util.tree_leaves(bundle_params), jax.tree_util.tree_leaves(merged)):
        # merged by export on its own mesh: the B @ A products may round differently in the last bit
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # fine-tuning on from a LoRA run (here without adapters) starts from its merged weights
    plain = sft_config(tiny_pipeline, sft_run["data"], "")
    plain.init_from = run
    started = trainer.init_from_pretrained(plain, trainer.Trainer(plain, mesh), str(tmp_path / "next"))
    for a, b in zip(jax.tree_util.tree_leaves(started), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_init_from_rejects_another_model_or_vocabulary(tiny_pipeline, sft_run, tmp_path):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    config = sft_config(tiny_pipeline, sft_run["data"], "")
    config.model.d_ff = 128
    with pytest.raises(ValueError, match="model.d_ff=128"):
        trainer.init_from_pretrained(config, trainer.Trainer(config, mesh), str(tmp_path))
    config = sft_config(tiny_pipeline, str(tmp_path / "data"), "")
    from cm3leon_jax import text_tokenizer
    theirs = vocab_lib.Vocabulary.load(os.path.join(sft_run["data"], prepare.VOCAB_DIR))
    other = vocab_lib.Vocabulary(theirs.text_tokenizer, theirs.num_image_codes, theirs.image_tokens_per_image,
                                 num_sentinels=8)
    other.save(str(tmp_path / "data" / prepare.VOCAB_DIR))
    assert isinstance(theirs.text_tokenizer, text_tokenizer.TextTokenizer)
    with pytest.raises(ValueError, match="vocab_dir"):
        trainer.init_from_pretrained(config, trainer.Trainer(config, mesh), str(tmp_path))


def test_minuscule_sft_run_evaluates_every_task_against_the_baseline(tiny_pipeline, sft_run):
    out = sft_run["root"] / "eval"
    report = sft_eval.evaluate(sft_run["sft"], tiny_pipeline["lm"], num_examples=2, classifier_steps=2,
                               classifier_workdir=str(sft_run["root"] / "classifier"), out_dir=str(out))
    for side in ("model", "baseline"):
        for task in sft_tasks.TASKS:
            value = report[side][task][sft_eval.PRIMARY[task]]
            assert 0.0 <= value <= 1.0, (side, task, value)
    for task in sft_tasks.TASKS:  # the paired difference of the primary metric is the two figures' difference
        primary = sft_eval.PRIMARY[task]
        d = report["primary_difference"][task]
        assert d["difference"] == pytest.approx(report["model"][task][primary] - report["baseline"][task][primary])
        assert d["interval"][0] <= d["difference"] + 1e-9 and d["difference"] - 1e-9 <= d["interval"][1]
    assert report["model"]["_step"] == 4 and json.load(open(out / "sft_eval.json"))["tasks"] == list(sft_tasks.TASKS)
    table = (out / "sft_eval.md").read_text()
    assert all(f"| {t} |" in table for t in sft_tasks.TASKS) and "95% bootstrap interval, paired" in table


def test_generate_cli_edits_with_three_stream_guidance(sft_run, tmp_path):
    ex = sft_tasks.shapes_example("edit", "validation", 0, image_size=IMAGE_SIZE)
    Image.fromarray(ex["source"]).save(tmp_path / "in.png")
    run_cli("cm3leon_jax.generate", "--workdir", sft_run["sft"], "--task", "edit", "--image", tmp_path / "in.png",
            "--prompt", "make the circle blue", "--num_samples", "2", "--out", tmp_path)
    record = json.load(open(tmp_path / "edit.json"))
    assert record["settings"]["cfg_scale"] == 7.5 and record["settings"]["image_cfg_scale"] == 1.5
    grid = np.asarray(Image.open(tmp_path / "edit.png"))
    assert grid.shape == (IMAGE_SIZE + 4, 3 * (IMAGE_SIZE + 2) + 2, 3)  # the input, then 2 edits


def test_sft_config_from_a_lora_run_takes_its_architecture_not_its_adapters(tmp_path):
    """sft_tiny.py:LORA_RUN is full fine-tuning of the LoRA run's merged weights; it used to copy the
    run's lora_rank (and lora_base_int8) with the model section and silently train adapters instead."""
    from experiments import sft_lora_tiny, sft_tiny
    model = dict(sft_lora_tiny.get_config().model.to_dict(), lora_rank=8, lora_base_int8=True)
    (tmp_path / "config.json").write_text(json.dumps({"model": model, "data": {"seq_len": 256}}))
    full = sft_tiny.get_config(str(tmp_path))
    assert full.model.lora_rank == 0 and not full.model.lora_base_int8 and full.init_from == str(tmp_path)
    adapters = sft_lora_tiny.get_config(str(tmp_path))
    assert adapters.model.lora_rank == 16 and not adapters.model.lora_base_int8


def test_generate_task_refuses_inputs_its_template_would_drop(tmp_path):
    """`generate --task caption --prompt ...` captioned without the prompt, a second --prompt and a
    --prompt beside vqa's --question were dropped, --control_type and --cd_fraction were ignored."""
    import types
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    given = set()

    class Flags(types.SimpleNamespace):
        def __getitem__(self, name):
            return types.SimpleNamespace(present=name in given)

    base = dict(task="caption", image=[str(tmp_path / "x.png")], prompt=[], question=None, control_type=None,
                out=str(tmp_path), workdir=str(tmp_path), num_samples=1, seed=0, max_text_tokens=4)
    cases = [(dict(prompt=["a red circle"]), "does not use --prompt"),
             (dict(task="vqa", question="what?", prompt=["what color?"]), "does not use --prompt"),
             (dict(task="edit", prompt=["make it blue", "make it red"]), "give one --prompt, not 2"),
             (dict(task="edit", prompt=["make it blue"], question="what?"), "does not use --question"),
             (dict(task="edit", prompt=["make it blue"], control_type="edge"), "does not use --control_type")]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            sft_generate.run_cli(None, Flags(**dict(base, **fields)))
    given.add("cd_fraction")
    with pytest.raises(ValueError, match="does not use --cd_fraction"):
        sft_generate.run_cli(None, Flags(**dict(base, task="edit", prompt=["make it blue"])))
    given.discard("cd_fraction")
    given.add("num_samples")   # a text task wrote one caption whatever --num_samples said
    with pytest.raises(ValueError, match="does not use --num_samples"):
        sft_generate.run_cli(None, Flags(**dict(base, num_samples=4)))


def test_generate_task_refuses_an_image_cfg_scale_it_would_not_read(tmp_path):
    """One kind of condition (segment: an image; text_to_image: a caption) is two-stream CFG by
    --cfg_scale: `--task segment --image_cfg_scale 3` drew unguided, recording the scale as applied."""
    import types
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")

    class Flags(types.SimpleNamespace):
        def __getitem__(self, name):
            return types.SimpleNamespace(present=name == "image_cfg_scale")

    base = dict(image=[str(tmp_path / "x.png")], prompt=[], question=None, control_type=None, image_cfg_scale=3.0,
                out=str(tmp_path), workdir=str(tmp_path), num_samples=1, seed=0, max_text_tokens=4)
    for fields in (dict(task="segment"), dict(task="text_to_image", image=[], prompt=["a red circle"])):
        with pytest.raises(ValueError, match="does not use --image_cfg_scale"):
            sft_generate.run_cli(None, Flags(**dict(base, **fields)))
    sft_generate._check_inputs("edit", Flags(**dict(base, task="edit", prompt=["make it blue"])))   # three streams


def test_task_weights_for_tasks_the_data_lacks_say_so(monkeypatch):
    """"caption=1,segment=3" on data without segment documents trained on captions alone, silently."""
    from unittest import mock
    report = {"splits": {"train": {"tasks": {"caption": [0, 4], "vqa": [4, 6]}}}}
    monkeypatch.setattr(sft_prepare, "load_report", lambda data_dir: report)
    monkeypatch.setattr(sft_prepare, "load_sft_documents", lambda data_dir, split: list(range(6)))
    data_config = ml_collections.ConfigDict(dict(sft_task_weights="caption=1,vqa=1", sft_max_upsample=3.0,
                                                 sft_min_downsample=0.3))
    with mock.patch.object(sft_pipeline.logging, "warning") as warning:
        sft_pipeline.task_mixture(data_config, "D")
        assert not warning.called
        data_config.sft_task_weights = "caption=1,vqa=1,segment=3"
        _, counts = sft_pipeline.task_mixture(data_config, "D")
        assert counts["segment"] == 0 and warning.call_count == 1
        assert "holds no" in warning.call_args[0][0] and warning.call_args[0][2] == "segment"


def test_sft_eval_refuses_bad_tasks_and_split_up_front(tmp_path):
    """A task named twice printed its rows twice, no task wrote an empty report, and an unknown split
    failed only after the model was loaded."""
    for kwargs, message in ((dict(tasks=("vqa", "vqa")), "name each task to evaluate once"),
                            (dict(tasks=()), "name each task to evaluate once"),
                            (dict(split="valid"), "--split='valid'")):
        with pytest.raises(ValueError, match=message):
            sft_eval.evaluate(str(tmp_path / "no_such_workdir"), **kwargs)


def test_task_prompts_take_text_as_ingestion_stored_it():
    """Ingestion collapses whitespace and refuses special strings; a `--prompt " a red\\n circle"` was
    tokenized as given (tokens training never saw) and `<eos>` in it became a control token."""
    import types
    tasks = sft_generate.TaskGenerator(types.SimpleNamespace(vocab=None))
    assert tasks.encode_fields("text_to_image", [{"caption": " a red\n circle  \ufeff"}]) == [{"caption": "a red circle"}]
    for text, message in (("a <eos> circle", "spells a special token"), (" \n", "is empty")):
        with pytest.raises(ValueError, match=message):
            tasks.encode_fields("text_to_image", [{"caption": text}])
