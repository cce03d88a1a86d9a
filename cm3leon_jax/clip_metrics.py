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
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

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
