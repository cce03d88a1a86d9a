"""CLIP score and Frechet distance in CLIP features from a user's local CLIP checkpoint."""
import importlib.util
import os

import numpy as np
import pytest

from cm3leon_jax import clip_metrics, shapes_metrics
from tests.clip_fixture import write_tiny_clip

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None or
                              importlib.util.find_spec("torch") is None,
                              reason="needs the interop extra (torch, transformers)")


def test_clip_score_is_clamped_scaled_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    assert clip_metrics.clip_score_from_features(a, 5 * a) == pytest.approx(100.0)
    # orthogonal -> 0, opposite -> 0 (clamped, not negative), 60 degrees -> 50
    b = np.array([[0.0, 1.0], [0.0, -1.0], [0.5, np.sqrt(3) / 2]])
    assert clip_metrics.clip_score_from_features(a, b) == pytest.approx((0 + 0 + 50) / 3)
    with pytest.raises(ValueError, match="aligned"):
        clip_metrics.clip_score_from_features(a, a[:2])


@needs_hf
def test_scorer_matches_transformers_and_refuses_bad_checkpoints(tmp_path):
    import torch
    from transformers import CLIPModel, CLIPProcessor
    model_dir = write_tiny_clip(str(tmp_path / "clip"))
    scorer = clip_metrics.ClipScorer(model_dir, batch_size=3)   # several batches
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    captions = ["a red star", "a blue circle at the top left", "x", "two green squares", "a " * 40 + "long one"]
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        px = processor(images=list(images), return_tensors="pt")["pixel_values"]
        want_img = clip_metrics._projected(model.get_image_features(pixel_values=px)).numpy()
    got_img = scorer.image_features(images)
    np.testing.assert_allclose(got_img, want_img, atol=1e-5)
    got_txt = scorer.text_features(captions)
    assert got_txt.shape == (5, 16) and np.isfinite(got_txt).all()
    cos = np.sum(got_img * got_txt, 1) / np.linalg.norm(got_img, axis=1) / np.linalg.norm(got_txt, axis=1)
    assert scorer.clip_score(images, captions) == pytest.approx(100 * np.maximum(cos, 0).mean(), abs=1e-4)
    assert shapes_metrics.frechet_distance(got_img, got_img) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="images but"):
        scorer.clip_score(images, captions[:2])

    with pytest.raises(ValueError, match="no config.json"):
        clip_metrics.ClipScorer(str(tmp_path))
    with open(os.path.join(model_dir, "config.json")) as f:
        config = f.read()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write(config.replace('"model_type": "clip"', '"model_type": "opt"'))
    with pytest.raises(ValueError, match="not a CLIP one"):
        clip_metrics.ClipScorer(model_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write(config)
    os.remove(os.path.join(model_dir, "model.safetensors"))
    with pytest.raises(ValueError, match="no model.safetensors"):
        clip_metrics.ClipScorer(model_dir)


def test_evaluate_checks_the_clip_checkpoint_before_anything_loads(tmp_path):
    from cm3leon_jax import evaluate
    with pytest.raises(ValueError, match="not a Hugging Face CLIP checkpoint"):
        evaluate.evaluate("/nonexistent", clip_model=str(tmp_path))


@needs_hf
def test_prompts_file_samples_are_scored_against_a_reference_folder(tmp_path):
    import json

    from PIL import Image

    from tests.helpers import run_cli
    model_dir = write_tiny_clip(str(tmp_path / "clip"))
    rng = np.random.default_rng(1)
    samples, reference = tmp_path / "samples", tmp_path / "reference"
    (samples / "images").mkdir(parents=True)
    (reference / "sub").mkdir(parents=True)
    captions = {0: "a red star", 2: "a blue circle", 3: "two green squares"}
    drawn = {}
    with open(samples / "manifest.jsonl", "w") as f:
        for index, caption in captions.items():
            files = [f"images/{index:06d}_{k}.png" for k in range(2)]
            for rel in files:
                drawn[rel] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(drawn[rel]).save(samples / rel)
            f.write(json.dumps({"index": index, "caption": "stale" if index == 2 else caption, "files": files}) + "\n")
        # caption 2 drawn again by a resumed run: its last line is current
        f.write(json.dumps({"index": 2, "caption": captions[2], "files": [f"images/{2:06d}_{k}.png" for k in range(2)]})
                + "\n")
    os.remove(samples / "images" / "000003_1.png")   # a missing sample is counted
    real = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(4)]
    for i, image in enumerate(real):
        Image.fromarray(image).save(reference / ("sub" if i % 2 else "") / f"r{i}.png")
    (reference / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (reference / "notes.txt").write_text("not an image")

    proc = run_cli("cm3leon_jax.clip_metrics", "--samples", samples, "--clip_model", model_dir, "--reference",
                   reference, "--reference_size", "32", "--batch_size", "2")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((samples / "clip_metrics.json").read_text())
    assert (report["captions"], report["samples"], report["missing_files"]) == (3, 5, 1)
    assert (report["reference_images"], report["reference_undecodable"]) == (4, 1)

    scorer = clip_metrics.ClipScorer(model_dir)
    kept = [(rel, captions[int(rel[7:13])]) for rel in sorted(drawn) if rel != "images/000003_1.png"]
    images = np.stack([drawn[rel] for rel, _ in kept])
    assert report["clip_score"] == pytest.approx(scorer.clip_score(images, [c for _, c in kept]), abs=1e-3)
    firsts = [i for i, (rel, _) in enumerate(kept) if rel.endswith("_0.png")]
    assert report["clip_score_first"] == pytest.approx(
        scorer.clip_score(images[firsts], [kept[i][1] for i in firsts]), abs=1e-3)
    from data_pipeline.images import center_crop_resize
    want_fd = shapes_metrics.frechet_distance(scorer.image_features(images[firsts]), scorer.image_features(
        np.stack([center_crop_resize(Image.fromarray(r), 32) for r in real])))
    assert report["fd_clip"] == pytest.approx(want_fd, rel=1e-4)


def test_bad_scoring_arguments_are_refused_before_any_image_is_embedded(tmp_path):
    class Unusable:   # a scorer that must not be reached
        def image_features(self, images):
            raise AssertionError("an image was embedded before the arguments were checked")
        text_features = image_features

    samples = tmp_path / "samples"
    (samples / "images").mkdir(parents=True)
    (samples / "manifest.jsonl").write_text('{"index": 0, "caption": "a red star", "files": ["images/0.png"]}\n')
    reference = tmp_path / "reference"
    reference.mkdir()
    with pytest.raises(ValueError, match="--reference .* is not a directory"):
        clip_metrics.score_samples(Unusable(), str(samples), str(tmp_path / "no_such_folder"))
    with pytest.raises(ValueError, match="reference_size must be >= 1"):   # 0 used to skip the resize
        clip_metrics.score_samples(Unusable(), str(samples), str(reference), reference_size=0)
    with pytest.raises(ValueError, match="--samples .* is not a directory"):
        clip_metrics.score_samples(Unusable(), str(tmp_path / "no_samples"))
    with pytest.raises(ValueError, match="--out .* folder does not exist"):   # not after every image was scored
        clip_metrics.check_score_args(str(samples), None, 256, out=str(tmp_path / "missing" / "scores.json"))
    clip_metrics.check_score_args(str(samples), str(reference), 256, out=str(tmp_path / "scores.json"))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):   # not range()'s error after loading
        clip_metrics.ClipScorer(str(tmp_path), batch_size=0)
