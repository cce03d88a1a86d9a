"""Losses for training the VQ-GAN tokenizer (pure, jittable functions + two Linen modules).

The training step that wraps these (sharded ``jit``, optax, checkpoints) lives elsewhere; this
module only promises that ``vq_loss_fn`` and ``disc_loss_fn`` are pure functions of arrays and
static configs, so they can be differentiated, jitted and sharded freely.

Generator objective (taming-transformers / LlamaGen):

    L_G = w_l1 * L1 + w_l2 * L2 + w_p * perceptual              (reconstruction, "nll";
                                                                   L1, L2 optionally edge-weighted)
        + w_cb * (codebook + commitment)                          (VQ-VAE terms, beta inside)
        + gate(step) * disc_weight * lambda_adaptive * hinge_G    (adversarial)

with ``lambda_adaptive = ||dL_rec/dW_last|| / (||dL_G_adv/dW_last|| + 1e-4)`` (clipped, no
gradient), ``W_last`` being the decoder's output conv kernel.  The discriminator is a PatchGAN
trained with the hinge loss and switched on only after ``disc_start`` steps: a GAN on top of
blurry early reconstructions destabilises the codebook.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax import vqgan
from cm3leon_jax.vqgan import (
    VQGANConfig,
    _dataclass_from_config,
    code_counts,  # noqa: F401  (re-exported for callers that only import the losses)
    normalize_images,
    perplexity_from_counts,
)

Array = jax.Array
PyTree = Any


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VQLossConfig:
    """Loss weights and discriminator shape.  Frozen/hashable, so it can be a static jit arg.

    Defaults follow LlamaGen's tokenizer recipe (l2 reconstruction 1.0, codebook 1.0,
    disc 0.5, disc start 20k) plus L1 1.0 (taming) because L1 keeps flat-colour edges sharp,
    which matters for the synthetic shapes data.  ``perceptual_weight`` only acts when feature
    network weights are supplied (``perceptual_weights_path``); nothing is downloaded.
    """

    l1_weight: float = 1.0
    l2_weight: float = 1.0
    edge_weight: float = 0.0  # > 0: L1/L2 weight 1 + edge_weight at the target's edges (edge_weights)
    perceptual_weight: float = 1.0
    perceptual_weights_path: str = ""  # .npz or .safetensors; "" disables the perceptual loss
    codebook_weight: float = 1.0  # multiplies (codebook + commitment); beta is in the model cfg
    disc_weight: float = 0.5  # 0 removes the GAN entirely (no discriminator compute at all)
    disc_start: int = 20_000
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1e4
    disc_channels: int = 64
    disc_layers: int = 3
    disc_norm: str = "group"  # "group" or "none"; never BatchNorm (batch-coupled under pmap/jit)

    def __post_init__(self):
        # a NaN/inf weight made every loss NaN (each step skipped, then a stop blaming the learning rate),
        # a negative one trained that term the wrong way; 0 discriminator channels failed inside JAX's init
        for name in ("l1_weight", "l2_weight", "edge_weight", "perceptual_weight", "codebook_weight", "disc_weight",
                     "adaptive_weight_max"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"loss.{name}={getattr(self, name)} must be >= 0 and finite")
        if self.disc_weight and self.disc_channels < 1:
            raise ValueError(f"loss.disc_channels={self.disc_channels} must be >= 1 (or loss.disc_weight=0: no GAN)")

    @classmethod
    def from_config(cls, cfg: Any) -> "VQLossConfig":
        return _dataclass_from_config(cls, cfg)


# --------------------------------------------------------------------------------------------
# Reconstruction metrics
# --------------------------------------------------------------------------------------------


def l1_loss(x: Array, y: Array) -> Array:
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l2_loss(x: Array, y: Array) -> Array:
    return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def edge_weights(x: Array, strength: float) -> Array:
    """Per-pixel loss weights [B,H,W,1]: 1 in flat areas, up to 1 + strength on both sides of the
    target's edges (the largest channel step to a neighbour), normalised to mean 1 per image.

    Plain pixel losses barely see an outline: a blob of the right colour and area scores almost
    as well as the right shape when objects cover a few percent of the image. Weighting the same
    L1/L2 towards edges makes the outline count without a second network (a GAN or perceptual
    loss cost several times the step here)."""
    x = x.astype(jnp.float32)
    dx = jnp.abs(jnp.diff(x, axis=2)).max(-1, keepdims=True)
    dy = jnp.abs(jnp.diff(x, axis=1)).max(-1, keepdims=True)
    step = jnp.maximum(jnp.pad(dx, ((0, 0), (0, 0), (0, 1), (0, 0))) + jnp.pad(dx, ((0, 0), (0, 0), (1, 0), (0, 0))),
                       jnp.pad(dy, ((0, 0), (0, 1), (0, 0), (0, 0))) + jnp.pad(dy, ((0, 0), (1, 0), (0, 0), (0, 0))))
    edge = jnp.minimum(step / 0.25, 1.0)  # a step of 1/8 of the [-1, 1] range counts fully
    w = 1.0 + strength * edge
    return w / jnp.mean(w, axis=(1, 2, 3), keepdims=True)


def psnr(x: Array, y: Array, data_range: float = 2.0) -> Array:
    """Mean over images of per-image PSNR in dB.  ``data_range`` is 2 for [-1,1] images.

    Per-image then averaged (not PSNR of the batch MSE) so that the number matches what the
    benchmark and papers report.  A perfect reconstruction is capped at 100 dB instead of inf.
    """
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    mse = jnp.mean(jnp.square(x - y).reshape(x.shape[0], -1), axis=-1)
    val = 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-10))
    return jnp.mean(jnp.minimum(val, 100.0))


def codebook_usage(counts: Array) -> Array:
    """Fraction of codes used at least once (counts may be per batch or accumulated)."""
    return jnp.mean((counts > 0).astype(jnp.float32))


def code_perplexity(counts: Array) -> Array:
    """exp(entropy) of the code histogram; equals K when all K codes are used uniformly."""
    return perplexity_from_counts(counts)


# --------------------------------------------------------------------------------------------
# PatchGAN discriminator + hinge losses
# --------------------------------------------------------------------------------------------


class PatchGANDiscriminator(nn.Module):
    """taming's NLayerDiscriminator: 4x4 convs, stride 2 ``n_layers`` times, LeakyReLU 0.2,
    one logit per overlapping patch.  GroupNorm (or none) instead of BatchNorm so the output of
    one image never depends on the rest of the (sharded) batch.  'SAME' padding keeps a
    non-empty logit map even for 16x16 test images."""

    channels: int = 64
    n_layers: int = 3
    norm: str = "group"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.norm not in ("group", "none"):
            raise ValueError(f"disc norm must be 'group' or 'none', got {self.norm!r}")
        conv = lambda f, s, name: nn.Conv(
            f, (4, 4), strides=(s, s), padding="SAME", dtype=self.dtype,
            param_dtype=jnp.float32, name=name)
        h = nn.leaky_relu(conv(self.channels, 2, "conv0")(x.astype(self.dtype)), 0.2)
        for i in range(1, self.n_layers + 1):
            width = self.channels * min(2**i, 8)
            stride = 2 if i < self.n_layers else 1
            h = conv(width, stride, f"conv{i}")(h)
            if self.norm == "group":
                h = nn.GroupNorm(num_groups=vqgan._groups(width, 32), dtype=self.dtype,
                                 param_dtype=jnp.float32, name=f"norm{i}")(h)
            h = nn.leaky_relu(h, 0.2)
        return conv(1, 1, "conv_out")(h).astype(jnp.float32)


def make_discriminator(loss_config: Any, dtype: Any = jnp.float32) -> PatchGANDiscriminator:
    cfg = VQLossConfig.from_config(loss_config)
    return PatchGANDiscriminator(cfg.disc_channels, cfg.disc_layers, cfg.disc_norm, dtype)


def init_discriminator(rng: Array, loss_config: Any, image_shape: Sequence[int]) -> PyTree:
    """Discriminator params (bare tree) for images of shape [H, W, C]."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return jax.jit(make_discriminator(loss_config).init)(rng, dummy)["params"]


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: Array) -> Array:
    return -jnp.mean(logits_fake)


def disc_gate(step: Any, disc_start: int) -> Array:
    """1.0 once ``step >= disc_start``, else 0.0 (float32, traced-step friendly)."""
    return (jnp.asarray(step) >= disc_start).astype(jnp.float32)


def _tree_norm(tree: PyTree) -> Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def adaptive_generator_weight(
    rec_loss_of_last: Callable[[PyTree], Array],
    gan_loss_of_last: Callable[[PyTree], Array],
    last_layer: PyTree,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> Array:
    """taming's ``calculate_adaptive_weight`` in functional form.

    Both losses are given as functions of the last layer's params only (everything before it
    held fixed), so ``jax.grad`` of each yields exactly torch's ``autograd.grad(loss,
    last_layer)``.  Balancing the two gradient norms at the layer they share keeps the GAN from
    swamping reconstruction (or vanishing) regardless of the losses' absolute scales.
    Stop-gradient on the inputs prevents the outer training grad from differentiating through
    these inner grads (no second-order terms, and the result is a constant, as in taming).
    """
    last_layer = jax.lax.stop_gradient(last_layer)
    rec_norm = _tree_norm(jax.grad(rec_loss_of_last)(last_layer))
    gan_norm = _tree_norm(jax.grad(gan_loss_of_last)(last_layer))
    return jax.lax.stop_gradient(jnp.clip(rec_norm / (gan_norm + eps), 0.0, max_weight))


# --------------------------------------------------------------------------------------------
# Optional perceptual loss from user-supplied VGG-style weights
# --------------------------------------------------------------------------------------------

# LPIPS' ScalingLayer: maps [-1,1] images to ImageNet-normalised inputs expected by VGG weights.
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)

_CONV_KEY = re.compile(r"^stage(\d+)_conv(\d+)[./](kernel|bias)$")
_LIN_KEY = re.compile(r"^lin(\d+)$")


class VGGFeatures(nn.Module):
    """VGG-style feature pyramid: per stage, 3x3 conv+ReLU blocks; the stage's last ReLU output
    is a feature map; 2x2 max-pool between stages (LPIPS taps relu1_2 ... relu5_3 of VGG16).

    ``stages`` gives the output width of every conv, e.g. VGG16 =
    ((64,64),(128,128),(256,256,256),(512,512,512),(512,512,512)).  Param names
    ``stage{i}_conv{j}`` are those of the weight file."""

    stages: Tuple[Tuple[int, ...], ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        feats = []
        h = x.astype(self.dtype)
        for i, widths in enumerate(self.stages):
            if i > 0:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for j, w in enumerate(widths):
                h = nn.relu(nn.Conv(w, (3, 3), padding="SAME", dtype=self.dtype,
                                    param_dtype=jnp.float32, name=f"stage{i}_conv{j}")(h))
            feats.append(h.astype(jnp.float32))
        return feats


def load_perceptual_weights(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """Load feature-network weights for ``perceptual_loss``; ``None``/"" -> ``None`` (disabled).

    File layout (.npz via ``np.load(allow_pickle=False)`` or .safetensors; no pickle):
      ``stage{i}_conv{j}.kernel`` [3,3,Cin,Cout] (HWIO; torch's OIHW needs
      ``transpose(2,3,1,0)``), ``stage{i}_conv{j}.bias`` [Cout]; ``/`` also accepted as separator;
      optional ``lin{i}`` [C_i] non-negative per-channel LPIPS weights, one per stage (without
      them channels are averaged uniformly); optional ``shift``/``scale`` [3] input
      normalisation (default: LPIPS' constants for [-1,1] inputs).
    The architecture is inferred from the file, so any VGG-like stack works and tests can use a
    tiny random one.  Returns a pytree of numpy arrays: pass it to ``vq_loss_fn`` as an
    argument (not a closure constant) so the weights are not baked into the compiled program.
    """
    if not path:
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"perceptual weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        raw = dict(load_file(path))
    else:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}

    params: Dict[str, Dict[str, np.ndarray]] = {}
    lins: Dict[int, np.ndarray] = {}
    extra = {"shift": LPIPS_SHIFT, "scale": LPIPS_SCALE}
    for key, val in raw.items():
        val = np.asarray(val, np.float32)
        if m := _CONV_KEY.match(key):
            params.setdefault(f"stage{m[1]}_conv{m[2]}", {})[m[3]] = val
        elif m := _LIN_KEY.match(key):
            lins[int(m[1])] = val.reshape(-1)
        elif key in extra:
            extra[key] = val.reshape(3)
        else:
            raise ValueError(f"unexpected key {key!r} in perceptual weights {path}")
    if not params:
        raise ValueError(f"no stage{{i}}_conv{{j}} weights in {path}")
    for name, p in params.items():
        if set(p) != {"kernel", "bias"} or p["kernel"].ndim != 4:
            raise ValueError(f"{name}: need a 4-d HWIO 'kernel' and a 'bias', got {sorted(p)}")
    stages = _stages_from_params(params)
    n_stages = len(stages)
    if lins and sorted(lins) != list(range(n_stages)):
        raise ValueError(f"lin weights must be given for all {n_stages} stages, got {sorted(lins)}")
    _check_feature_chain(params, stages, lins, path)
    return {
        "params": params,
        "lins": [lins[i] for i in range(n_stages)] if lins else None,
        "shift": extra["shift"],
        "scale": extra["scale"],
    }


def _check_feature_chain(params, stages, lins, path) -> None:
    """Every shape VGGFeatures will apply, checked at load: a wrong file otherwise fails inside the
    first compiled training step (Flax's param-shape error), or, for negative lin weights, trains
    on a perceptual loss that rewards differences."""
    cin = 3
    for i, widths in enumerate(stages):
        for j, cout in enumerate(widths):
            name = f"stage{i}_conv{j}"
            kernel, bias = params[name]["kernel"], params[name]["bias"]
            if kernel.shape[:3] != (3, 3, cin):
                hint = (" (torch's OIHW layout? transpose it with .transpose(2, 3, 1, 0))"
                        if kernel.shape[-2:] == (3, 3) else "")
                raise ValueError(f"{path}: {name}.kernel has shape {kernel.shape}, expected [3, 3, {cin}, out] "
                                 f"(3x3 HWIO after {cin} input channels){hint}")
            if bias.shape != (cout,):
                raise ValueError(f"{path}: {name}.bias has shape {bias.shape}, expected [{cout}]")
            cin = cout
        if lins and (lins[i].shape != (cin,) or (lins[i] < 0).any()):
            raise ValueError(f"{path}: lin{i} must be {cin} non-negative weights (stage {i}'s width), got shape "
                             f"{lins[i].shape}, min {lins[i].min() if lins[i].size else None}")


def _stages_from_params(params: Mapping[str, Any]) -> Tuple[Tuple[int, ...], ...]:
    """Architecture from param shapes (static under jit, so usable inside traced code)."""
    idx = sorted(tuple(map(int, re.findall(r"\d+", k))) for k in params)
    n_stages = max(i for i, _ in idx) + 1
    stages = []
    for i in range(n_stages):
        js = sorted(j for s, j in idx if s == i)
        if js != list(range(len(js))) or not js:
            raise ValueError(f"stage {i} convs must be numbered 0..n-1, got {js}")
        stages.append(tuple(int(params[f"stage{i}_conv{j}"]["kernel"].shape[-1]) for j in js))
    return tuple(stages)


def perceptual_loss(weights: Optional[Mapping[str, Any]], x: Array, y: Array) -> Array:
    """LPIPS-style distance between [-1,1] images ``x`` and ``y`` (mean over the batch).

    Per stage: unit-normalise features over channels, squared difference, weight channels by
    ``lin`` (or average them), average over space; sum over stages.  ``weights=None`` returns 0,
    which is the default, so nothing depends on pretrained networks being present.
    """
    if weights is None:
        return jnp.zeros((), jnp.float32)
    weights = jax.tree_util.tree_map(lambda a: jax.lax.stop_gradient(jnp.asarray(a)), weights)
    net = VGGFeatures(_stages_from_params(weights["params"]))
    shift = weights["shift"].reshape(1, 1, 1, 3)
    scale = weights["scale"].reshape(1, 1, 1, 3)
    both = jnp.concatenate([x.astype(jnp.float32), y.astype(jnp.float32)], axis=0)
    feats = net.apply({"params": weights["params"]}, (both - shift) / scale)
    n = x.shape[0]
    total = jnp.zeros((), jnp.float32)
    for i, f in enumerate(feats):
        f = f * jax.lax.rsqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + 1e-10)
        d = jnp.square(f[:n] - f[n:])
        if weights["lins"] is not None:
            d = jnp.sum(d * weights["lins"][i], axis=-1)
        else:
            d = jnp.mean(d, axis=-1)
        total = total + jnp.mean(d)
    return total


# --------------------------------------------------------------------------------------------
# Training losses
# --------------------------------------------------------------------------------------------


def _batch_images(batch: Any) -> Array:
    if isinstance(batch, Mapping):
        for key in ("image", "images"):
            if key in batch:
                return batch[key]
        raise KeyError(f"batch needs an 'image' entry, has {sorted(batch)}")
    return batch


def vq_loss_fn(
    params: PyTree,
    disc_params: Optional[PyTree],
    batch: Any,
    rng: Optional[Array],
    step: Any,
    model_config: Any,
    loss_config: Any,
    perceptual_weights: Optional[Mapping[str, Any]] = None,
) -> Tuple[Array, Dict[str, Any]]:
    """Generator (encoder + quantizer + decoder) loss.  Pure; use under ``jax.value_and_grad(...,
    has_aux=True)`` w.r.t. ``params``.

    ``batch``: images [B,H,W,C] (uint8 or float in [-1,1]) or a dict with ``'image'``.
    ``step``: int or traced int; the GAN branch is a ``lax.cond`` so before ``disc_start`` no
    discriminator compute runs.  ``rng`` is accepted for signature stability (augmentation);
    nothing is random today.  Returns ``(loss, aux)``; ``aux`` holds ``metrics`` (scalars),
    ``recon`` (unclipped reconstructions: feed ``stop_gradient(recon)`` to ``disc_loss_fn``
    instead of running the generator twice), ``counts`` [K] and ``encodings`` (for
    ``vqgan.update_usage`` / ``vqgan.reseed_params``).
    """
    del rng
    mcfg = VQGANConfig.from_config(model_config)
    lcfg = VQLossConfig.from_config(loss_config)
    if lcfg.perceptual_weights_path and perceptual_weights is None and lcfg.perceptual_weight > 0:
        raise ValueError(
            "loss config names perceptual weights but none were passed: load them once with "
            "load_perceptual_weights(cfg.perceptual_weights_path) and pass them in"
        )
    x = normalize_images(_batch_images(batch), mcfg.pixel_scale)
    model = vqgan.VQGAN(mcfg)
    recon, q, feats = model.apply({"params": params}, x, return_features=True)

    use_perceptual = perceptual_weights is not None and lcfg.perceptual_weight > 0
    pixel_weights = edge_weights(x, lcfg.edge_weight) if lcfg.edge_weight > 0 else 1.0

    def rec_loss(r):
        """Weighted reconstruction ("nll") loss and its parts; also re-used, as a function of
        the last layer only, for the adaptive GAN weight."""
        d = r.astype(jnp.float32) - x.astype(jnp.float32)
        l1, l2 = jnp.mean(pixel_weights * jnp.abs(d)), jnp.mean(pixel_weights * jnp.square(d))
        p = perceptual_loss(perceptual_weights, x, r) if use_perceptual else jnp.zeros((), jnp.float32)
        return lcfg.l1_weight * l1 + lcfg.l2_weight * l2 + lcfg.perceptual_weight * p, (l1, l2, p)

    rec_total, (l1, l2, p_loss) = rec_loss(recon)
    vq_total = lcfg.codebook_weight * (q.codebook_loss + q.commitment_loss)

    gate = disc_gate(step, lcfg.disc_start)
    if lcfg.disc_weight > 0:
        if disc_params is None:
            raise ValueError("disc_weight > 0 needs disc_params (set disc_weight=0 to train without GAN)")
        disc = make_discriminator(lcfg, mcfg.compute_dtype)
        d_params = jax.lax.stop_gradient(disc_params)
        last = params["decoder"]["conv_out"]
        head = vqgan.decoder_out_conv(mcfg, name=None)
        feats_sg = jax.lax.stop_gradient(feats)

        def recon_from_kernel(kernel):
            p = {"kernel": kernel, "bias": jax.lax.stop_gradient(last["bias"])}
            return vqgan.pixels_from_head(mcfg, head.apply({"params": p}, feats_sg))

        def gan_on(recon_):
            g = hinge_g_loss(disc.apply({"params": d_params}, recon_))
            if lcfg.adaptive_weight:
                w = adaptive_generator_weight(
                    lambda k: rec_loss(recon_from_kernel(k))[0],
                    lambda k: hinge_g_loss(disc.apply({"params": d_params}, recon_from_kernel(k))),
                    last["kernel"],
                    max_weight=lcfg.adaptive_weight_max,
                )
            else:
                w = jnp.ones((), jnp.float32)
            return g, w

        def gan_off(recon_):
            return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)

        g_loss, adaptive_w = jax.lax.cond(gate > 0, gan_on, gan_off, recon)
        gan_total = gate * lcfg.disc_weight * adaptive_w * g_loss
    else:
        g_loss = adaptive_w = gan_total = jnp.zeros((), jnp.float32)

    loss = rec_total + vq_total + gan_total
    metrics = {
        "loss": loss,
        "recon_l1": l1,
        "recon_l2": l2,
        "perceptual": p_loss,
        "codebook_loss": q.codebook_loss,
        "commitment_loss": q.commitment_loss,
        "gan_g_loss": g_loss,
        "adaptive_weight": adaptive_w,
        "disc_factor": gate,
        "psnr": psnr(jnp.clip(recon, -1.0, 1.0), x),
        "codebook_usage": codebook_usage(q.counts),
        "perplexity": q.perplexity,
    }
    aux = {"metrics": metrics, "recon": recon, "counts": q.counts, "encodings": q.encodings}
    return loss, aux


def disc_loss_fn(
    disc_params: PyTree,
    batch: Any,
    fake: Array,
    step: Any,
    loss_config: Any,
    dtype: Any = jnp.float32,
    pixel_scale: float = vqgan.PIXEL_SCALE,
) -> Tuple[Array, Dict[str, Array]]:
    """Hinge loss of the PatchGAN on real ``batch`` vs generator output ``fake`` (gradient is
    stopped on ``fake``).  Zero, and no discriminator compute, before ``disc_start``.
    ``pixel_scale``: the VQGANConfig's, so uint8 reals are normalised as the generator saw them."""
    lcfg = VQLossConfig.from_config(loss_config)
    real = normalize_images(_batch_images(batch), pixel_scale)
    fake = jax.lax.stop_gradient(fake.astype(jnp.float32))
    disc = make_discriminator(lcfg, dtype)
    gate = disc_gate(step, lcfg.disc_start)

    def on(operands):
        real_, fake_ = operands
        logits = disc.apply({"params": disc_params}, jnp.concatenate([real_, fake_], axis=0))
        lr, lf = logits[: real_.shape[0]], logits[real_.shape[0]:]
        return hinge_d_loss(lr, lf), jnp.mean(lr), jnp.mean(lf)

    def off(operands):
        z = jnp.zeros((), jnp.float32)
        return z, z, z

    d_loss, lr_mean, lf_mean = jax.lax.cond(gate > 0, on, off, (real, fake))
    loss = gate * d_loss
    return loss, {"disc_loss": loss, "logits_real": lr_mean, "logits_fake": lf_mean, "disc_factor": gate}
