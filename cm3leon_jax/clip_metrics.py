"""CLIP score and a Frechet distance in CLIP image features, from a CLIP checkpoint the user has.

CLIP weights cannot be downloaded here, so nothing depends on them. A user with a Hugging Face
CLIP checkpoint directory (`config.json`, `model.safetensors`, the tokenizer and preprocessor
files, e.g. `openai/clip-vit-base-patch32` written with `save_pretrained`) passes it as
`evaluate --clip_model DIR`. Only safetensors weights are read (never a pickle), only from that
directory (never the hub). torch and transformers come from the `interop` extra and are imported
only then.

- CLIP score (Hessel et al. 2021, the torchmetrics definition): 100 * max(cos(image, caption), 0),
  averaged over the (image, caption) pairs.
- Frechet distance in CLIP image features (FD_CLIP; Kynkaenniemi et al. 2023 find it tracks human
  judgement better than Inception's): `shapes_metrics.frechet_distance` of the image embeddings.
  It is not FID, and is comparable only with numbers from the same checkpoint.

Samples written by `generate --prompts_file` are scored from the command line:

    python -m cm3leon_jax.clip_metrics --samples DIR --clip_model CLIP [--reference REAL_IMAGES_DIR]

CLIP score of every sample with its caption and of each caption's first (best, when reranked)
sample; with `--reference`, FD_CLIP between the first samples and a folder of real images (e.g.
MS-COCO val2014, the paper's zero-shot setting). Writes DIR/clip_metrics.json; the last line
printed is that JSON.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from cm3leon_jax.retriever import l2_normalize


def clip_score_from_features(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """100 * max(cosine, 0) averaged over aligned rows (features need not be normalised)."""
    a, b = np.asarray(image_features), np.asarray(text_features)
    if a.shape != b.shape or a.ndim != 2 or not len(a):
        raise ValueError(f"need aligned non-empty [N, D] image and text features, got {a.shape} and {b.shape}")
    a, b = l2_normalize(a.astype(np.float64)), l2_normalize(b.astype(np.float64))
    return float(100.0 * np.mean(np.maximum(np.sum(a * b, axis=1), 0.0)))


def _projected(output):
    # transformers 4.x returns the projected features; 5.x a ModelOutput holding them as pooler_output
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClipScorer:
    """A local CLIP checkpoint's image and text embeddings (CPU, float32, batched)."""

    def __init__(self, model_dir: str, batch_size: int = 64):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"--clip_model {model_dir!r} is not a Hugging Face CLIP checkpoint directory "
                             "(no config.json); write one with CLIPModel/CLIPProcessor.save_pretrained")
        if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
            raise ValueError(f"--clip_model {model_dir!r} has no model.safetensors (pickled weights are not "
                             "read: convert them with save_pretrained(..., safe_serialization=True))")
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
        if model_type != "clip":  # transformers would load another model's weights into a fresh CLIP
            raise ValueError(f"--clip_model {model_dir!r} holds a {model_type!r} checkpoint, not a CLIP one "
                             "(config.json model_type 'clip')")
        try:
            import torch
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as e:
            raise ValueError("--clip_model needs torch and transformers: pip install -e '.[interop]'") from e
        self._torch = torch
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True).eval()
        self.processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
        self.max_text_length = int(self.model.config.text_config.max_position_embeddings)
        self.batch_size = int(batch_size)
        self.model_dir = os.path.abspath(model_dir)

    def image_features(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, D] (unnormalised projections)."""
        images = np.asarray(images)
        out = []
        with self._torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = self.processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")
                out.append(_projected(self.model.get_image_features(pixel_values=batch["pixel_values"])).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def text_features(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> float32 [N, D]; longer than the model's context they are truncated."""
        out = []
        with self._torch.no_grad():
            for start in range(0, len(captions), self.batch_size):
                batch = self.processor(text=list(captions[start:start + self.batch_size]), return_tensors="pt",
                                       padding=True, truncation=True, max_length=self.max_text_length)
                out.append(_projected(self.model.get_text_features(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """l2-normalised image features: what retrieval and reranking compare."""
        return l2_normalize(self.image_features(images))

    def embed_text(self, captions: Sequence[str]) -> np.ndarray:
        """l2-normalised text features."""
        return l2_normalize(self.text_features(captions))

    def clip_score(self, images: np.ndarray, captions: Sequence[str]) -> float:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return clip_score_from_features(self.image_features(images), self.text_features(captions))


def read_manifests(samples_dir: str, required: bool = True) -> list[dict]:
    """`generate --prompts_file` rows of every manifest*.jsonl in the directory, one per caption
    index (a caption drawn again appends a line: the last one is current), by index. Also what a
    resumed `generate_many` has drawn (`required=False`: none yet is no error)."""
    rows = {}
    names = sorted(n for n in os.listdir(samples_dir) if n.startswith("manifest") and n.endswith(".jsonl"))
    if not names and required:
        raise ValueError(f"{samples_dir!r} has no manifest*.jsonl: write samples with generate --prompts_file")
    for name in names:
        with open(os.path.join(samples_dir, name), encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:   # cut by a kill mid-write (generate draws that caption again)
                    logging.warning("%s: skipped a line that is not complete JSON: %.80r", name, line)
                    continue
                rows[int(row["index"])] = row
    return [rows[i] for i in sorted(rows)]


def _features_of_files(scorer: ClipScorer, paths: Sequence[str], size: int | None,
                       chunk: int = 256) -> tuple[np.ndarray, list[bool]]:
    """CLIP image features of image files, `chunk` at a time (30,000 images never sit in memory
    at once); a file that cannot be decoded is left out and marked False."""
    from PIL import Image
    from data_pipeline.images import center_crop_resize, to_rgb
    features, ok = [], []
    for start in range(0, len(paths), chunk):
        images = []
        for path in paths[start:start + chunk]:
            try:
                with Image.open(path) as image:
                    image.load()
                    images.append(center_crop_resize(image, size) if size else np.asarray(to_rgb(image)))
                ok.append(True)
            except Exception:  # noqa: BLE001 -- any undecodable file is counted, whatever PIL raises
                ok.append(False)
        if images:
            features.append(scorer.image_features(np.stack(images)))
    return (np.concatenate(features) if features else np.zeros((0, 0), np.float32)), ok


def check_score_args(samples_dir: str, reference_dir: str | None, reference_size: int,
                     out: str | None = None) -> None:
    """What `score_samples` needs, checked before any image is embedded (a bad --reference used
    to surface only after every sample had been through CLIP; an --out in a missing folder, when
    the scores were to be written)."""
    if out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ValueError(f"--out {out!r}: its folder does not exist")
    if not os.path.isdir(samples_dir):
        raise ValueError(f"--samples {samples_dir!r} is not a directory: write samples with generate --prompts_file")
    if reference_dir is not None:
        if not os.path.isdir(reference_dir):
            raise ValueError(f"--reference {reference_dir!r} is not a directory of real images")
        if int(reference_size) < 1:   # 0 used to skip the resize: stacking images of several sizes failed
            raise ValueError(f"reference_size must be >= 1, got {reference_size}")


def score_samples(scorer: ClipScorer, samples_dir: str, reference_dir: str | None = None,
                  reference_size: int = 256) -> dict:
    """CLIP score of all samples and of each caption's first; FD_CLIP of the first samples
    against the reference folder's images (resized and centre-cropped to `reference_size`).
    Missing or undecodable files are counted, never silently dropped."""
    check_score_args(samples_dir, reference_dir, reference_size)
    rows = read_manifests(samples_dir)
    paths, captions, first = [], [], []
    missing = 0
    for row in rows:
        for k, rel in enumerate(row["files"]):
            path = os.path.join(samples_dir, rel)
            if not os.path.isfile(path):
                missing += 1
                continue
            paths.append(path)
            captions.append(row["caption"])
            first.append(k == 0)
    if not paths:
        raise ValueError(f"none of the files named in {samples_dir!r}'s manifests exists")
    features, ok = _features_of_files(scorer, paths, None)
    captions = [c for c, good in zip(captions, ok) if good]
    first = np.asarray([f for f, good in zip(first, ok) if good], bool)
    text = scorer.text_features(captions)
    report = {"clip_model": scorer.model_dir, "samples_dir": os.path.abspath(samples_dir), "captions": len(rows),
              "samples": int(len(captions)), "missing_files": missing, "undecodable_files": ok.count(False),
              "clip_score": clip_score_from_features(features, text),
              "clip_score_first": clip_score_from_features(features[first], text[first])}
    if reference_dir is not None:
        from cm3leon_jax import shapes_metrics
        from data_pipeline.images import list_image_files
        ref_paths = list_image_files(reference_dir)
        ref_features, ref_ok = _features_of_files(scorer, ref_paths, reference_size)
        if len(ref_features) < 2 or int(first.sum()) < 2:
            raise ValueError(f"FD_CLIP needs at least 2 images a side: {int(first.sum())} samples, "
                             f"{len(ref_features)} readable reference images in {reference_dir!r}")
        report.update(reference_dir=os.path.abspath(reference_dir), reference_images=int(len(ref_features)),
                      reference_undecodable=ref_ok.count(False),
                      fd_clip=shapes_metrics.frechet_distance(features[first], ref_features))
    return report


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    check_score_args(f.samples, f.reference, f.reference_size, f.out)   # before the model loads
    read_manifests(f.samples)
    scorer = ClipScorer(f.clip_model, batch_size=f.batch_size)
    report = score_samples(scorer, f.samples, f.reference, f.reference_size)
    out = f.out or os.path.join(f.samples, "clip_metrics.json")
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps(report))


def _define_flags():
    from absl import flags
    flags.DEFINE_string("samples", None, "a `generate --prompts_file` output directory", required=True)
    flags.DEFINE_string("clip_model", None, "local Hugging Face CLIP checkpoint directory (safetensors)",
                        required=True)
    flags.DEFINE_string("reference", None, "folder of real images (PNG/JPEG, searched recursively) for FD_CLIP")
    flags.DEFINE_integer("reference_size", 256, "reference images are resized and centre-cropped to this first")
    flags.DEFINE_integer("batch_size", 64, "images per CLIP forward")
    flags.DEFINE_string("out", None, "report path (default SAMPLES/clip_metrics.json)")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
