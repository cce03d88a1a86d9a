"""The trained VQ image tokenizer as a library: images <-> codes from a train_vq workdir.

Kept apart from `train_vq` (a command line with flags) so ingestion, generation and evaluation
import it without pulling in another program's flags.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import numpy as np

from cm3leon_jax import checkpointing, vqgan, workdir_io

VQ_CONFIG_FILE = "vq_config.json"


def save_vq_config(workdir: str, vq_config: vqgan.VQGANConfig) -> None:
    workdir_io.write_text(workdir_io.join(workdir, VQ_CONFIG_FILE), json.dumps(dataclasses.asdict(vq_config), indent=2))


def load_vq_config(workdir: str) -> vqgan.VQGANConfig:
    path = workdir_io.join(workdir, VQ_CONFIG_FILE)
    if not workdir_io.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a train_vq workdir?")
    return vqgan.VQGANConfig.from_config(json.loads(workdir_io.read_text(path)))


def load_tokenizer(workdir: str, step: int | None = None) -> tuple[Any, vqgan.VQGANConfig]:
    """(params, VQGANConfig) of a train_vq workdir's latest (or given) checkpoint: parameters only,
    restored by orbax onto the first local device; the optimizers and discriminator are not read."""
    config = load_vq_config(workdir)
    params, _ = checkpointing.restore_params(workdir, abstract_params(config), step)
    return params, config


def abstract_params(config: vqgan.VQGANConfig):
    """ShapeDtypeStructs of the VQ-GAN's params on the first local device, where the tokenizer
    runs (shared by the workdir and the params-bundle loaders)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(functools.partial(vqgan.init_params, config=config), jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


class VQTokenizer:
    """Images <-> discrete codes with a trained VQ-GAN (host numpy in, host numpy out).

    Batches are cut into chunks of `batch_size` (the last one padded), so any number of images
    runs through one compiled program.
    """

    def __init__(self, params, config, batch_size: int = 64):
        self.params, self.config = params, vqgan.VQGANConfig.from_config(config)
        self.batch_size = int(batch_size)

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, batch_size: int = 64) -> "VQTokenizer":
        params, config = load_tokenizer(workdir, step)
        return cls(params, config, batch_size)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def latent_size(self) -> int:
        return self.config.latent_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def has_decoder(self) -> bool:
        return self.config.has_decoder

    def require_decoder(self) -> None:
        """vqgan.NoDecoderError unless this tokenizer can decode codes to images: image generation
        calls it before sampling, so an encoder-only (Chameleon-imported) tokenizer fails at once."""
        if not self.config.has_decoder:
            raise vqgan.NoDecoderError(vqgan.NO_DECODER)

    def _chunks(self, array: np.ndarray, fn) -> np.ndarray:
        outs = []
        for i in range(0, len(array), self.batch_size):
            chunk = array[i:i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
            outs.append(np.asarray(fn(chunk))[:n])
        return np.concatenate(outs)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [B, S, S, 3] (or one [S, S, 3]) -> int32 codes [B, S/f, S/f] (or [S/f, S/f])."""
        images = np.asarray(images)
        single = images.ndim == 3
        if single:
            images = images[None]
        s, c = self.config.image_size, self.config.in_channels
        if images.dtype != np.uint8:
            raise TypeError(f"encode takes uint8 images, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (s, s, c):
            raise ValueError(f"expected images [B, {s}, {s}, {c}], got {images.shape}; resize them with "
                             "data_pipeline.images.center_crop_resize")
        if len(images) == 0:
            return np.zeros((0, self.latent_size, self.latent_size), np.int32)
        codes = self._chunks(images, lambda x: vqgan.encode(self.params, x, self.config)).astype(np.int32)
        return codes[0] if single else codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes [B, h, w] (or one [h, w]) in [0, codebook_size) -> uint8 images [B, S, S, 3]."""
        codes = np.asarray(codes)
        single = codes.ndim == 2
        if single:
            codes = codes[None]
        h = self.latent_size
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.ndim != 3 or codes.shape[1:] != (h, h):
            raise ValueError(f"expected codes [B, {h}, {h}], got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        if len(codes) == 0:
            s = self.image_size
            return np.zeros((0, s, s, self.config.in_channels), np.uint8)
        images = self._chunks(codes.astype(np.int32),
                              lambda x: vqgan.to_uint8(vqgan.decode(self.params, x, self.config), self.config.pixel_scale))
        return images[0] if single else images


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images (peak 255), capped at 100 dB for identical images."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.mean(diff.reshape(len(a), -1) ** 2, axis=1)
    return np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)), 100.0)


def same_patch_code_entropy(images: np.ndarray, codes: np.ndarray) -> dict[str, float]:
    """H(code | the patch's exact pixels) in nats, over patches whose pixels occur more than once.

    0 means identical patches always get the same code. An encoder that sees beyond its patch can
    spend codes on the surroundings instead: the LM then has to model that choice as noise (on the
    shapes world, where most patches are flat background, this was 4 nats per background token).
    """
    n, h, w = codes.shape
    f = images.shape[1] // h
    patches = images.reshape(n, h, f, w, f, -1).transpose(0, 1, 3, 2, 4, 5).reshape(n * h * w, -1)
    _, group = np.unique(patches, axis=0, return_inverse=True)
    group = group.reshape(-1)
    pairs, pair_counts = np.unique(np.stack([group, codes.reshape(-1)], 1), axis=0, return_counts=True)
    group_sizes = np.bincount(group)
    repeated = group_sizes[pairs[:, 0]] > 1
    p_code = pair_counts[repeated] / group_sizes[pairs[repeated, 0]]
    total = max(int(group_sizes[group_sizes > 1].sum()), 1)
    entropy = max(0.0, float(-np.sum(pair_counts[repeated] * np.log(p_code)) / total))  # no "-0.0"
    return {"same_patch_code_entropy_nats": entropy,
            "repeated_patch_share": float(group_sizes[group_sizes > 1].sum() / len(group))}


def reconstruction_quality(tokenizer: VQTokenizer, images: np.ndarray) -> dict[str, float]:
    """Mean PSNR of encode -> decode round trips, the share of codes used, the code perplexity and
    how consistently identical patches are coded (`same_patch_code_entropy`): the figures a
    tokenizer is judged by (bench/vq.py, evaluate)."""
    codes = tokenizer.encode(images)
    psnr = float(np.mean(psnr_uint8(images, tokenizer.decode(codes))))
    counts = np.bincount(codes.reshape(-1), minlength=tokenizer.codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {"psnr_db": psnr, "codebook_usage": float(np.mean(counts > 0)),
            "code_perplexity": float(np.exp(-np.sum(p * np.log(p)))), **same_patch_code_entropy(images, codes),
            "num_images": int(len(images))}
