"""VQ tokenizer bench: trains experiments/vq_tiny.py (its steps, at most a wall-clock budget), then measures it.

    python bench/vq.py [--budget_minutes 15] [--num_val_images 300] [--workdir DIR]

Training runs in-process through the real `train_vq.train` (start-up and compilation count
against the budget). Then, from the checkpoint through the public `VQTokenizer`: PSNR of
held-out shapes (validation split), codebook usage (% of codes used on them), encode images/s,
and PSNR on scikit-image's photographs (astronaut, coffee, chelsea) center-cropped to 64x64
(`pip install -e '.[bench]'`), and the attributes the evaluator's classifier still reads in
held-out images after the round trip (`evaluate.vq_ceiling`: shape, colour, position, count; the
best faithfulness any LM can reach through this tokenizer; PSNR alone hides lost outlines), and
the entropy of the codes given identical patch pixels (`same_patch_code_entropy`: what the LM
must model as noise).
The classifier trains into the bench workdir (about a minute) unless --classifier_dir has one.
Targets: PSNR >= 28 dB, >= 90% of codes, within 15 minutes.
PSNR is on the uint8 images (peak 255), averaged over images. The last line printed is one JSON
object with every figure.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_float("budget_minutes", 15.0, "wall-clock training budget: start-up, compilation, the final checkpoint "
                   "and sample grid included")
flags.DEFINE_integer("num_val_images", 300, "held-out shapes images (validation split) to measure on", lower_bound=1)
flags.DEFINE_string("bench_workdir", None, "where to train (default: a fresh temporary directory)")
flags.DEFINE_string("classifier_dir", None, "workdir holding a cached attribute classifier (e.g. an e2e "
                    "workdir); default: train one into the bench workdir")
flags.DEFINE_multi_string("override", [], "config override KEY=VALUE, repeatable (e.g. vq.channels=24), for tuning")
flags.register_validator("budget_minutes", lambda m: m > 0, "--budget_minutes must be > 0")
flags.register_validator("override", lambda items: all("=" in item for item in items),
                         "--override must be KEY=VALUE (e.g. total_steps=2500)")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import flag_checks  # noqa: E402
from cm3leon_jax import attribute_classifier, evaluate, metrics, train_vq, vq_tokenizer  # noqa: E402
from cm3leon_jax.config_defaults import get_field, set_field  # noqa: E402
from data_pipeline import images as image_data  # noqa: E402
from experiments import vq_tiny  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea")
TARGET_PSNR_DB, TARGET_USAGE, TARGET_MINUTES = 28.0, 0.90, 15.0
WRAP_UP_SECONDS = 30.0


def _apply_override(config, item: str) -> None:
    key, value = item.split("=", 1)
    current = get_field(config, key)
    set_field(config, key, type(current)(ast.literal_eval(value) if isinstance(current, (tuple, bool)) else value))


def photo_images(size: int) -> dict[str, np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        print("scikit-image is not installed (pip install -e '.[bench]'): skipping the photographs", flush=True)
        return {}
    return {name: image_data.center_crop_resize(getattr(skimage.data, name)(), size) for name in PHOTOS}


def main(argv):
    flag_checks.no_arguments(argv)
    metrics.quiet_library_logs()
    f = flags.FLAGS
    config = vq_tiny.get_config()
    # the loop stops WRAP_UP_SECONDS early: the final checkpoint and sample grid fit in the budget
    config.max_train_seconds = max(f.budget_minutes * 60.0 - WRAP_UP_SECONDS, 1.0)
    # the config's cosine schedule sets the steps; the budget stops a slower machine early
    config.checkpoint_every_steps = 10**8  # one checkpoint, at the end
    config.sample_every_steps = 0  # one sample grid, at the end (its compilation is not free)
    for item in f.override:
        _apply_override(config, item)
    workdir = f.bench_workdir or tempfile.mkdtemp(prefix="bench_vq_")
    os.makedirs(workdir, exist_ok=True)
    load_before = os.getloadavg()

    start = time.perf_counter()
    last = train_vq.train(config, workdir)
    train_seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    steps = max(r["step"] for r in records)
    speeds = [r["images_per_second"] for r in records if "images_per_second" in r]

    tok = train_vq.VQTokenizer.from_workdir(workdir, batch_size=64)
    size, k = tok.image_size, tok.codebook_size
    val = image_data.validation_images(config, f.num_val_images)
    tok.encode(val[:tok.batch_size])  # compile
    t0 = time.perf_counter()
    tok.encode(val)
    encode_seconds = time.perf_counter() - t0
    quality = vq_tokenizer.reconstruction_quality(tok, val)
    val_psnr, usage, perplexity = quality["psnr_db"], quality["codebook_usage"], quality["code_perplexity"]

    photos = photo_images(size)
    photo_psnr = {}
    if photos:
        batch = np.stack(list(photos.values()))
        photo_psnr = dict(zip(photos, map(float, vq_tokenizer.psnr_uint8(batch, tok.decode(tok.encode(batch))))))

    classifier = attribute_classifier.train_classifier(f.classifier_dir or workdir, image_size=size)
    ceiling = evaluate.vq_ceiling(tok, classifier, evaluate.heldout_prompts(f.num_val_images, size, "validation"))

    results = {
        "config": "experiments/vq_tiny.py", "overrides": list(f.override),
        "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
        "budget_minutes": f.budget_minutes, "train_seconds": round(train_seconds, 1), "steps": int(steps),
        "images_seen": int(steps * int(config.data.global_batch_size)),
        "train_images_per_second_median": float(np.median(speeds)) if speeds else None,
        "heldout_images": int(len(val)), "heldout_psnr_db": round(val_psnr, 3),
        "codebook_size": int(k), "codebook_usage": round(usage, 4), "heldout_code_perplexity": round(perplexity, 1),
        "same_patch_code_entropy_nats": round(quality["same_patch_code_entropy_nats"], 3),
        "repeated_patch_share": round(quality["repeated_patch_share"], 3),
        "encode_images_per_second": round(len(val) / encode_seconds, 1),
        "heldout_attributes_after_round_trip": {key: round(ceiling[key], 4) for key in
                                                ("requested",) + evaluate.REQUESTED},
        "photo_psnr_db": {n: round(v, 3) for n, v in photo_psnr.items()},
        "photo_psnr_mean_db": round(float(np.mean(list(photo_psnr.values()))), 3) if photo_psnr else None,
        "last_train_metrics": {key: last.get(key) for key in ("psnr", "codebook_usage", "perplexity", "recon_loss")},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "workdir": workdir,
    }
    results["targets_met"] = {
        "psnr": val_psnr >= TARGET_PSNR_DB, "codebook_usage": usage >= TARGET_USAGE,
        "time": train_seconds <= TARGET_MINUTES * 60,
    }
    print(f"trained {steps} steps ({results['images_seen']} images) in {train_seconds:.0f} s", flush=True)
    print(f"held-out PSNR {val_psnr:.2f} dB (target {TARGET_PSNR_DB}), codebook usage {100 * usage:.1f}% "
          f"(target {100 * TARGET_USAGE:.0f}%), perplexity {perplexity:.0f} of {k}; identical patches' code entropy "
          f"{quality['same_patch_code_entropy_nats']:.2f} nats", flush=True)
    print("attributes the classifier reads after the round trip: " + ", ".join(
        f"{key} {100 * v:.1f}%" for key, v in results["heldout_attributes_after_round_trip"].items()), flush=True)
    print(f"encode {results['encode_images_per_second']} images/s; photographs: "
          + ", ".join(f"{n} {v:.2f} dB" for n, v in photo_psnr.items()), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
