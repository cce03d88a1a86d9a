"""The one-command pipeline on a minuscule config: every stage runs, the report is complete, a
rerun is served from the cache, and changed settings in the same workdir are refused."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from cm3leon_jax import e2e
from experiments import e2e_tiny
from tests import pipeline_fixture


def minuscule_config():
    c = e2e_tiny.get_config()
    c.text_tokenizer.update(vocab_size=300, num_captions=300)
    c.vq = pipeline_fixture.vq_config()
    c.data = pipeline_fixture.data_config("", "")
    c.data.num_documents = ml_collections.ConfigDict({"train": 48, "validation": 8})
    c.retrieval.update(steps=4, batch_size=16, width=16, embed_dim=16, log_every=2)
    c.lm.update(total_steps=3, log_every_steps=1, checkpoint_every_steps=3)
    c.lm.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64, max_length=256)
    c.lm.data.update(seq_len=128, global_batch_size=8, num_neighbours=1)
    c.evaluate.update(strategies=("topp_topk_cfg", "greedy"), num_prompts=2, num_samples=2, num_captions=2,
                      num_val_documents=4, neighbour_counts=(0, 1), num_vq_images=8, classifier_steps=3)
    return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("e2e"))
    config = minuscule_config()
    e2e.Pipeline(config, workdir).run()
    return config, workdir


def test_every_stage_runs_and_the_report_is_complete(finished):
    _, workdir = finished
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert set(report["stages"]) == set(e2e.STAGES) - {"report"}
    ev = report["evaluation"]
    for name in ("topp_topk_cfg", "greedy"):
        scores = ev["text_to_image"][name]
        assert 0.0 <= scores["requested"] <= 1.0 and scores["scored_images"] == 4
        assert scores["frechet_distance_classifier_features"] >= 0.0
        assert os.path.exists(os.path.join(workdir, "eval", f"text_to_image_{name}.png"))
    assert 0.0 <= ev["image_to_text"]["overall"] <= 1.0
    assert set(ev["validation_loss"]) == {"0", "1"} and all(v["loss"] > 0 for v in ev["validation_loss"].values())
    assert ev["vq"]["num_images"] == 8 and ev["vq"]["psnr_db"] > 0
    md = open(os.path.join(workdir, "report.md")).read()
    for heading in ("Text -> image", "Image -> text", "Validation loss", "VQ tokenizer", "| total |"):
        assert heading in md


def test_rerun_is_cached_and_changed_settings_are_refused(finished):
    config, workdir = finished
    timings = e2e.Pipeline(config, workdir).run(until="lm")
    assert all(t["cached"] for t in timings.values()) and set(timings) == {"text_tokenizer", "vq", "data",
                                                                           "retrieval", "lm"}
    changed = minuscule_config()
    changed.vq.total_steps = 5
    with pytest.raises(ValueError, match="stage 'vq'.*other settings"):
        e2e.Pipeline(changed, workdir).run(until="lm")


def test_fingerprints_chain_through_upstream_stages():
    a, b = minuscule_config(), minuscule_config()
    b.data.seed = 1
    pa, pb = e2e.Pipeline(a, "/tmp/unused_a"), e2e.Pipeline(b, "/tmp/unused_b")
    assert pa.fingerprints["vq"] == pb.fingerprints["vq"]
    assert all(pa.fingerprints[s] != pb.fingerprints[s] for s in ("data", "retrieval", "lm", "evaluate"))


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
