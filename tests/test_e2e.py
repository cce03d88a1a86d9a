"""The one-command pipeline on a minuscule config: every stage runs, the report is complete, a
rerun is served from the cache, and changed settings in the same workdir are refused."""
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from cm3leon_jax import e2e
from tests import pipeline_fixture


@pytest.fixture(scope="module")
def finished(tiny_pipeline):
    """The shared fixture ran the stages up to the LM with this config; run the rest."""
    config = pipeline_fixture.e2e_config()
    e2e.Pipeline(config, tiny_pipeline["root"]).run()
    return config, tiny_pipeline["root"]


def test_every_stage_runs_and_the_report_is_complete(finished):
    _, workdir = finished
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert set(report["stages"]) == set(e2e.STAGES) - {"report"}
    ev = report["evaluation"]
    for name in ("topp_topk_cfg", "greedy"):
        scores = ev["text_to_image"][name]
        assert 0.0 <= scores["requested"] <= 1.0 and scores["scored_images"] == 4
        assert scores["neighbours"] == 1  # the config's image_neighbours reached the prompts
        assert scores["frechet_distance_classifier_features"] >= 0.0
        assert os.path.exists(os.path.join(workdir, "eval", f"text_to_image_{name}.png"))
    # the config's guidance scale and nucleus replace the strategy's; greedy keeps neither
    assert ev["text_to_image"]["topp_topk_cfg"]["sampling"]["cfg_scale"] == 2.5
    assert ev["text_to_image"]["topp_topk_cfg"]["sampling"]["top_p"] == 0.8
    assert ev["text_to_image"]["greedy"]["sampling"]["cfg_scale"] == 1.0
    assert ev["text_to_image"]["greedy"]["sampling"]["top_p"] == 1.0
    assert ev["prompt_split"] == "test"
    # paired bootstrap over the 2 prompts: no topp scored, so the first strategy is the baseline
    boot = ev["text_to_image_bootstrap"]
    assert boot["baseline"] == "topp_topk_cfg" and boot["num_items"] == 2 and set(boot["differences"]) == {"greedy"}
    for name in ("topp_topk_cfg", "greedy"):
        lo, hi = boot["shares"][name]["interval"]
        assert boot["shares"][name]["share"] == pytest.approx(ev["text_to_image"][name]["requested"])
        assert lo - 1e-9 <= ev["text_to_image"][name]["requested"] <= hi + 1e-9
    assert 0.0 <= ev["text_to_image_vq_ceiling"]["requested"] <= 1.0  # the prompts' own images, VQ round trip
    assert 0.0 <= ev["image_to_text"]["overall"] <= 1.0
    assert set(ev["validation_loss"]) == {"0", "1"} and all(v["loss"] > 0 for v in ev["validation_loss"].values())
    assert ev["vq"]["num_images"] == 8 and ev["vq"]["psnr_db"] > 0
    # the training stages' last logged values (this LM's rows are too short for a held-out loss)
    lm, vq = report["training"]["lm"], report["training"]["vq"]
    assert set(lm) == {"loss", "tokens_per_second"} and lm["loss"]["step"] == pipeline_fixture.LM_STEPS
    assert vq["val_psnr"]["step"] == 4 and vq["val_psnr"]["value"] > 0
    md = open(os.path.join(workdir, "report.md")).read()
    assert f"| lm | loss | {lm['loss']['value']:.4g} | {pipeline_fixture.LM_STEPS} |" in md
    for heading in ("Text -> image", "| topp_topk_cfg, 1 retrieved |", "ceiling: the real images through the VQ",
                    "percentile-bootstrap intervals over the 2 prompts", "| greedy |",
                    "Image -> text", "Validation loss", "VQ tokenizer", "| total |"):
        assert heading in md


def test_rerun_is_cached_and_changed_settings_are_refused(finished):
    config, workdir = finished
    timings = e2e.Pipeline(config, workdir).run(until="evaluate")
    assert all(t["cached"] for t in timings.values()) and set(timings) == set(e2e.STAGES) - {"report"}
    changed = pipeline_fixture.e2e_config()
    changed.vq.total_steps = 5
    with pytest.raises(ValueError, match="stage 'vq'.*other settings"):
        e2e.Pipeline(changed, workdir).run(until="lm")


def test_fingerprints_chain_through_upstream_stages():
    a, b = pipeline_fixture.e2e_config(), pipeline_fixture.e2e_config()
    b.data.seed = 1
    pa, pb = e2e.Pipeline(a, "/tmp/unused_a"), e2e.Pipeline(b, "/tmp/unused_b")
    assert pa.fingerprints["vq"] == pb.fingerprints["vq"]
    assert all(pa.fingerprints[s] != pb.fingerprints[s] for s in ("data", "retrieval", "lm", "evaluate"))
    b.data.seed, b.data.decode_threads = 0, 5   # a speed-only setting: the same stages
    assert e2e.Pipeline(b, "/tmp/unused_b").fingerprints == pa.fingerprints
    assert "decode_threads" in a.data
    b.seed = 1   # the evaluation's sampling seed: only the evaluation (and the report) are redone
    changed = e2e.Pipeline(b, "/tmp/unused_b").fingerprints
    assert [s for s in e2e.STAGES if changed[s] != pa.fingerprints[s]] == ["evaluate", "report"]


def test_cli_runs_a_stage_and_resumes(tmp_path):
    cmd = [sys.executable, "-m", "cm3leon_jax.e2e", "--config", "experiments/e2e_tiny.py", "--workdir", str(tmp_path),
           "--config.text_tokenizer.num_captions=300", "--config.text_tokenizer.vocab_size=300",
           "--until", "text_tokenizer"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(2):
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    assert "done already" in out.stderr
    assert os.path.exists(tmp_path / "text_tokenizer" / "spm.model")


def test_a_preempted_stage_is_not_marked_done(tmp_path):
    class Interrupted(e2e.Pipeline):
        def text_tokenizer(self):
            return {}

        def vq(self):
            return {"preempted": True, "final_step": 3}

    pipeline = Interrupted(pipeline_fixture.e2e_config(), str(tmp_path))
    pipeline.run(until="lm")
    assert pipeline.stopped == "vq" and pipeline.done("text_tokenizer") and not pipeline.done("vq")
    Interrupted(pipeline_fixture.e2e_config(), str(tmp_path)).run(until="lm")  # stopped again

    class Resumed(Interrupted):
        def vq(self):
            time.sleep(0.2)
            return {"final_step": 5}

        def data(self):
            return {"preempted": True, "final_step": 1}

    (tmp_path / "report.md").write_text("an older run's report")
    resumed = Resumed(pipeline_fixture.e2e_config(), str(tmp_path))
    resumed.run(until="lm")
    # a resumed stage reports the time of every run, not only the last one's
    assert resumed.done("vq") and resumed.timings["vq"]["runs"] == 3 and resumed.timings["vq"]["seconds"] >= 0.2
    assert not os.path.exists(tmp_path / "stages" / "vq.partial.json")
    assert resumed.stopped == "data" and os.path.exists(tmp_path / "stages" / "data.partial.json")
    assert e2e.finished_report(resumed, "report") is None   # main used to print the older report as this run's
    resumed.stopped = None
    assert e2e.finished_report(resumed, "report") == "an older run's report"


def test_changed_settings_are_refused_before_anything_runs_naming_every_stage_to_redo(tmp_path):
    trained = []

    class Stub(e2e.Pipeline):
        def lm(self):
            trained.append(int(self.config.lm.total_steps))
            os.makedirs(self.dirs["lm"], exist_ok=True)
            return {}

    for stage in ("text_tokenizer", "vq", "data", "retrieval", "evaluate"):
        setattr(Stub, stage, lambda self: {})
    config = pipeline_fixture.e2e_config()
    Stub(config, str(tmp_path)).run(until="evaluate")
    changed = pipeline_fixture.e2e_config()
    changed.lm.total_steps += 5
    with pytest.raises(ValueError, match="stage 'lm'") as refused:
        Stub(changed, str(tmp_path)).run(until="evaluate")
    message = str(refused.value)   # the evaluation's outputs were made from that LM: they go too
    for path in ("lm", "stages/lm.json", "eval", "stages/evaluate.json"):
        assert str(tmp_path / path) in message
    with open(tmp_path / "e2e_config.json") as f:   # still the config of the outputs on disk
        assert json.load(f)["lm"]["total_steps"] == config.lm.total_steps
    # deleting the LM's alone used to retrain it, then refuse the evaluation: now refused up front
    os.remove(tmp_path / "stages" / "lm.json")
    with pytest.raises(ValueError, match="stage 'evaluate'"):
        Stub(changed, str(tmp_path)).run(until="evaluate")
    assert trained == [config.lm.total_steps]


def test_an_interrupted_stage_is_not_resumed_under_other_settings(tmp_path):
    class Stub(e2e.Pipeline):
        def text_tokenizer(self):
            return {}

        def vq(self):   # leaves a checkpoint behind, as train_vq does, then stops
            os.makedirs(self.dirs["vq"], exist_ok=True)
            if self.config.vq.total_steps == 3:
                raise KeyboardInterrupt   # killed: no partial marker of its own
            return {"preempted": True, "final_step": 2}

    for first in (4, 3):   # preempted, then crashed
        workdir = str(tmp_path / f"run{first}")
        config = pipeline_fixture.e2e_config()
        config.vq.total_steps = first
        with pytest.raises(KeyboardInterrupt) if first == 3 else contextlib.nullcontext():
            Stub(config, workdir).run(until="vq")
        changed = pipeline_fixture.e2e_config()
        changed.vq.total_steps = 9
        # used to resume the other settings' checkpoints and mark the stage done with these
        with pytest.raises(ValueError, match="stage 'vq'.*interrupted while it ran with other settings"):
            Stub(changed, workdir).run(until="vq")
        again = Stub(config, workdir)   # the settings it started with resume it
        if first == 4:
            again.run(until="vq")
            assert again.stopped == "vq"


def test_ablation_files_load_share_upstream_stages_and_tabulate(finished, tmp_path):
    from cm3leon_jax import ablate
    configs = {os.path.basename(p)[:-3]: ablate.load_config(p) for p in ablate.config_paths("all", [])}
    assert set(configs) == set(ablate.SETS["all"])
    base = configs["ablation_retrieval_k2"]
    assert configs["ablation_retrieval_k0"].lm.data.num_neighbours == 0 < base.lm.data.num_neighbours
    assert configs["ablation_no_condition_dropout"].lm.data.condition_dropout_rate == 0.0
    for cfg in configs.values():
        cfg.cache_dir = str(tmp_path / "cache")
    pipelines = {name: e2e.Pipeline(cfg, str(tmp_path / name)) for name, cfg in configs.items()}
    fp = {name: p.fingerprints for name, p in pipelines.items()}
    assert len({f["retrieval"] for f in fp.values()}) == 1  # one tokenizer, VQ, dataset and index for all
    assert fp["ablation_decoding"]["lm"] == fp["ablation_retrieval_k2"]["lm"]  # the table reuses the base LM
    assert len({fp[n]["lm"] for n in ("ablation_retrieval_k2", "ablation_retrieval_k0",
                                      "ablation_no_condition_dropout", "ablation_model_small")}) == 4
    assert pipelines["ablation_decoding"].dirs["lm"] == pipelines["ablation_retrieval_k2"].dirs["lm"]
    config, workdir = finished
    with open(os.path.join(workdir, "report.json")) as f:
        row = ablate.summarise("minuscule", config, json.load(f))
    table = ablate.markdown([row])
    assert "| minuscule |" in table and "val loss k=1" in table and "t2i greedy" in table
    lo, hi = row["text_to_image_interval"]["greedy"]
    assert f"{100 * row['text_to_image_requested']['greedy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" in table


def test_cached_runs_with_other_retrieval_settings_never_share_a_neighbour_sidecar(tmp_path):
    seen = {}

    class Stub(e2e.Pipeline):
        def data(self):
            os.makedirs(self.dirs["data"], exist_ok=True)
            return {}

        def retrieval(self):   # index.build writes the sidecar into the data directory
            with open(os.path.join(self.dirs["retrieval"], "neighbours.txt"), "w") as f:
                f.write(str(self.config.retrieval.steps))
            return {}

        def lm(self):   # lm_config() hands the LM the data directory
            with open(os.path.join(self.dirs["data"], "neighbours.txt")) as f:
                seen[self.config.lm.total_steps] = f.read()
            return {}

    for stage in ("text_tokenizer", "vq"):
        setattr(Stub, stage, lambda self: {})
    for retriever_steps, lm_steps in ((10, 4), (20, 5), (10, 6)):   # the third: the first's retrieval, cached
        config = pipeline_fixture.e2e_config()
        config.cache_dir = str(tmp_path / "cache")
        config.retrieval.steps, config.lm.total_steps = retriever_steps, lm_steps
        Stub(config, str(tmp_path / f"run{lm_steps}")).run(until="lm")
    assert seen == {4: "10", 5: "20", 6: "10"}   # the third used to train on the second run's neighbours


def test_ablation_configs_are_all_checked_before_the_first_run(tmp_path, monkeypatch):
    from cm3leon_jax import ablate

    def no_run(self, until="report"):
        raise AssertionError(f"{self.workdir} started before every config was checked")

    monkeypatch.setattr(e2e.Pipeline, "run", no_run)
    good = ablate.config_paths("retrieval", [])[0]
    with pytest.raises(FileNotFoundError, match="no experiment config"):   # used to fail after the first run
        ablate.run(str(tmp_path), [good, str(tmp_path / "typo.py")])
    copy = tmp_path / "other" / os.path.basename(good)
    copy.parent.mkdir()
    copy.write_text(open(good).read())
    with pytest.raises(ValueError, match="share the file name"):   # both would run in WORKDIR/NAME
        ablate.run(str(tmp_path), [good, str(copy)])
    with pytest.raises(ValueError, match=r"must be \.py files"):
        ablate.run(str(tmp_path), [good, good[:-3]])
    unread = tmp_path / "unread_field.py"   # loads, but the pipeline refuses a field it does not read
    unread.write_text("from experiments import e2e_tiny\n\n\ndef get_config():\n    c = e2e_tiny.get_config()\n"
                      "    c.evaluate.int8 = True\n    return c\n")
    with pytest.raises(ValueError, match="evaluate.int8"):   # used to be refused only after the first run
        ablate.run(str(tmp_path), [good, str(unread)])


def test_a_preempted_ablation_run_stops_the_runner_and_is_not_tabulated(tmp_path, monkeypatch):
    from cm3leon_jax import ablate
    started = []

    def preempted(self, until="report"):
        started.append(os.path.basename(self.workdir))
        self.stopped = "lm"   # SIGTERM during the LM: saved, not finished
        return self.timings

    monkeypatch.setattr(e2e.Pipeline, "run", preempted)
    paths = ablate.config_paths("retrieval", [])
    stale = tmp_path / "ablation_retrieval_k2" / "report.json"   # an earlier run's report of the same name
    stale.parent.mkdir()
    stale.write_text(json.dumps({"evaluation": {}, "stages": {}}))
    # used to tabulate the stale report and start the next config's training under the SIGTERM
    assert ablate.run(str(tmp_path), paths) == [] and started == ["ablation_retrieval_k2"]
    assert not (tmp_path / "results.md").exists()


def test_evaluation_of_the_validation_loss_alone(finished, tmp_path):
    from cm3leon_jax import evaluate
    _, workdir = finished
    report = evaluate.evaluate(os.path.join(workdir, "lm"), out_dir=str(tmp_path), num_prompts=0, num_captions=0,
                               num_vq_images=0, num_val_documents=4, neighbour_counts=(0, 1), classifier_dir=workdir)
    assert report["text_to_image"] == {} and "image_to_text" not in report and "vq" not in report
    assert set(report["validation_loss"]) == {"0", "1"}
    assert report["validation_loss"]["1"]["neighbours_found"] == 1.0
    # the paired bootstrap reads the same per-document sums: its point estimates are the losses
    boot = report["validation_loss_bootstrap"]
    assert boot["baseline"] == "0" and set(boot["differences"]) == {"1"}
    for k in ("0", "1"):
        assert boot["shares"][k]["share"] == pytest.approx(report["validation_loss"][k]["loss"], rel=1e-6)
    assert boot["differences"]["1"]["difference"] == pytest.approx(
        report["validation_loss"]["1"]["loss"] - report["validation_loss"]["0"]["loss"], rel=1e-6)
    with open(tmp_path / "report.md") as f:
        assert "minus k=0 [95% bootstrap interval, paired by document]" in f.read()


def test_cd_k_settings_and_captions_with_retrieved_documents(finished, tmp_path):
    from cm3leon_jax import evaluate
    _, workdir = finished
    report = evaluate.evaluate(os.path.join(workdir, "lm"), out_dir=str(tmp_path),
                               strategies=["topp", "topp_cdk_rerank"], baseline_strategy="topp_cdk_rerank",
                               num_prompts=2, num_samples=2, num_captions=2, num_val_documents=0, num_vq_images=0,
                               classifier_dir=workdir, cd_k=3, cd_alpha=0.5, top_p=0.8, caption_neighbours=2)
    boot = report["text_to_image_bootstrap"]  # the named baseline, not TopP
    assert boot["baseline"] == "topp_cdk_rerank" and set(boot["differences"]) == {"topp"}
    row = report["text_to_image"]["topp_cdk_rerank"]
    assert (row["cd_sampling"]["cd_k"], row["cd_sampling"]["cd_alpha"]) == (3, 0.5)
    assert (row["sampling"]["cd_k"], row["sampling"]["top_p"]) == (0, 0.8)  # the TopP half stays TopP
    assert 0.0 <= row["sample_diversity"] <= 1.0
    # image -> text with 2 documents retrieved by each image, beside the copy-the-nearest-caption control
    assert report["image_to_text"]["neighbours"] == 2
    assert 0.0 <= report["image_to_text_nearest_caption"]["overall"] <= 1.0
    boot = report["image_to_text_bootstrap"]  # generated captions against the control, paired by image
    assert boot["baseline"] == "nearest_caption" and set(boot["differences"]) == {"generated"}
    assert boot["shares"]["generated"]["share"] == pytest.approx(report["image_to_text"]["overall"])
    assert boot["shares"]["nearest_caption"]["share"] == pytest.approx(
        report["image_to_text_nearest_caption"]["overall"])
    with open(tmp_path / "report.md") as f:
        markdown = f.read()
    assert "2 retrieved documents prepended" in markdown and "(control)" in markdown
    assert "Overall caption accuracy with 95% percentile-bootstrap intervals over the 2 images" in markdown


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
                    reason="needs the interop extra (torch, transformers)")
def test_evaluation_with_a_user_clip_checkpoint(finished, tmp_path):
    from cm3leon_jax import evaluate
    from tests.clip_fixture import write_tiny_clip
    _, workdir = finished
    clip_dir = write_tiny_clip(str(tmp_path / "clip"))
    out = tmp_path / "eval"
    report = evaluate.evaluate(os.path.join(workdir, "lm"), out_dir=str(out), strategies=["topp"],
                               num_prompts=2, num_samples=2, num_captions=0, num_val_documents=0, num_vq_images=0,
                               classifier_dir=workdir, clip_model=clip_dir)
    row = report["text_to_image"]["topp"]
    assert 0.0 <= row["clip_score"] <= 100.0 and row["frechet_distance_clip_features"] >= 0.0
    assert report["clip"]["model"] == os.path.abspath(clip_dir)
    assert 0.0 <= report["clip"]["real_images_clip_score"] <= 100.0
    with open(out / "report.md") as f:
        markdown = f.read()
    assert "| topp | " in markdown and "CLIP score" in markdown and "(the real images)" in markdown


def test_evaluation_settings_are_checked_up_front():
    from cm3leon_jax import evaluate
    with pytest.raises(ValueError, match="image_neighbours must be >= 0"):
        evaluate.evaluate("/nonexistent", image_neighbours=-1)
    with pytest.raises(ValueError, match="unknown decoding strategies"):
        evaluate.evaluate("/nonexistent", strategies=["beam"])
    with pytest.raises(ValueError, match=r"named more than once: \['topp'\]"):   # drawn and scored twice
        evaluate.evaluate("/nonexistent", strategies="topp,greedy,topp")
    with pytest.raises(ValueError, match="num_prompts must be >= 0"):
        evaluate.evaluate("/nonexistent", num_prompts=-1)
    with pytest.raises(ValueError, match="caption_neighbours must be >= 0"):
        evaluate.evaluate("/nonexistent", caption_neighbours=-1)
    with pytest.raises(ValueError, match="num_prompts must be 0 or at least 2"):
        evaluate.evaluate("/nonexistent", num_prompts=1)
    # these used to fail only after every image was generated (np.stack of nothing, max() of nothing,
    # a negative slice of the retrieved documents)
    with pytest.raises(ValueError, match="num_vq_images must be >= 0"):
        evaluate.evaluate("/nonexistent", num_vq_images=-1)
    with pytest.raises(ValueError, match="num_val_documents must be >= 0"):
        evaluate.evaluate("/nonexistent", num_val_documents=-1)
    for counts in ((), (0, -1), (1.5,)):
        with pytest.raises(ValueError, match="neighbour_counts must be one or more integers >= 0"):
            evaluate.evaluate("/nonexistent", neighbour_counts=counts)
    with pytest.raises(FileNotFoundError, match="no_such_network.npz"):   # used to load after the classifier trained
        evaluate.evaluate("/nonexistent", feature_network="/nonexistent/no_such_network.npz")
    with pytest.raises(ValueError, match="baseline_strategy 'greedy' is not among"):
        evaluate.evaluate("/nonexistent", strategies=["topp", "topp_cfg"], baseline_strategy="greedy")


def test_an_evaluate_field_the_stage_does_not_read_is_refused(tmp_path):
    from experiments import e2e_tiny
    e2e.Pipeline(pipeline_fixture.e2e_config(), str(tmp_path / "fixture"))   # every field read
    config = e2e_tiny.get_config()
    config.evaluate.int8 = True   # a keyword of evaluate.evaluate that the stage never passed on
    with pytest.raises(ValueError, match=r"evaluate.int8: the e2e evaluate stage does not read \['int8'\]"):
        e2e.Pipeline(config, str(tmp_path / "w"))
    config = e2e_tiny.get_config()
    config.text_tokenizer.character_coverage = 0.99   # a sentencepiece option the stage never passes on
    with pytest.raises(ValueError, match=r"text_tokenizer.character_coverage: the e2e text_tokenizer stage does not"):
        e2e.Pipeline(config, str(tmp_path / "w"))


def test_a_field_the_pipeline_sets_itself_is_refused(tmp_path):
    from experiments import e2e_tiny
    e2e.Pipeline(e2e_tiny.get_config(), str(tmp_path / "defaults"))   # the inherited defaults pass
    for name, value in (("data.spm_model", "/my/spm.model"), ("data.vq_workdir", "/my/vq"),
                        ("lm.data.data_dir", "/my/data"), ("lm.data.source", "sft"), ("lm.model.vocab_size", 4096)):
        config = e2e_tiny.get_config()
        e2e.config_defaults.set_field(config, name, value)   # used to be replaced by the stages' own, silently
        with pytest.raises(ValueError, match=rf"{name}=.*sets {name} from its own stages"):
            e2e.Pipeline(config, str(tmp_path / "w"))


def test_a_trainers_config_is_refused_as_no_e2e_config(tmp_path):
    from experiments import tiny_cpu
    with pytest.raises(ValueError, match="no text_tokenizer, vq, retrieval, lm, evaluate section"):   # was AttributeError
        e2e.Pipeline(tiny_cpu.get_config(), str(tmp_path))


def test_the_gpu_config_is_e2e_tiny_with_bigger_budgets():
    """README's GPU results speak for e2e_tiny's recipe only while nothing but the budgets differ."""
    from flax import traverse_util
    from experiments import e2e_gpu, e2e_tiny
    gpu, tiny = (traverse_util.flatten_dict(module.get_config().to_dict(), sep=".") for module in (e2e_gpu, e2e_tiny))
    assert gpu.keys() == tiny.keys()
    assert {k for k in gpu if gpu[k] != tiny[k]} == {
        "vq.total_steps", "vq.checkpoint_every_steps", "vq.sample_every_steps", "data.num_documents.train",
        "lm.total_steps", "lm.checkpoint_every_steps", "lm.log_every_steps", "evaluate.num_prompts",
        "evaluate.num_samples"}
    assert gpu["lm.total_steps"] > tiny["lm.total_steps"] and gpu["vq.total_steps"] > tiny["vq.total_steps"]


def test_the_lm_alone_config_is_the_e2e_lm_stage_config(finished):
    from experiments import e2e_tiny, e2e_tiny_lm
    _, workdir = finished
    alone = e2e_tiny_lm.get_config(os.path.join(workdir, "data"))
    stage = e2e.Pipeline(e2e_tiny.get_config(), workdir).lm_config()  # what the e2e lm stage would train
    assert alone.to_dict() == stage.to_dict()
    assert alone.data.source == "cm3" and alone.model.vocab_size != e2e_tiny.get_config().lm.model.vocab_size
    with pytest.raises(ValueError, match="needs the prepared data"):
        e2e_tiny_lm.get_config("")


def test_a_stage_marker_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run killed while writing a marker left torn JSON that every rerun failed to read."""
    path = str(tmp_path / "stages" / "lm.json")
    e2e._write_marker(path, {"stage": "lm", "fingerprint": "a", "runs": 1})

    def killed_before_the_rename(src, dst):   # the new marker only partly on disk, in its temporary file
        with open(src, "w", encoding="utf-8") as f:
            f.write('{"stage": "lm", "finger')
        raise KeyboardInterrupt

    monkeypatch.setattr(e2e.workdir_io.os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        e2e._write_marker(path, {"stage": "lm", "fingerprint": "b", "runs": 2})
    monkeypatch.undo()
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["fingerprint"] == "a"   # the old marker, whole
