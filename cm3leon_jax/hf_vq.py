"""Chameleon's VQ image tokenizer (transformers `ChameleonVQVAE`, the `model.vqmodel.*` tensors of
`ChameleonForConditionalGeneration`) <-> our `vqgan.VQGAN`.

Both are taming-style encoders with the same blocks (GroupNorm(32, eps 1e-6) + swish ResBlocks with
a 1x1 `nin_shortcut`, single-head attention with 1x1 q/k/v/proj_out, stride-2 downsampling after
(0, 1) padding) and a nearest-code quantizer between two 1x1 projections. What differs is named by
config fields: Chameleon's `latent_channels` is our `embed_dim`, its codebook width `embed_dim` our
`code_dim`, `quant_conv`/`post_quant_conv` our `quant_proj`/`post_quant_proj`; its lookup is
Euclidean (our `l2_normalize_codes=False`); attention sits at the levels whose resolution is in
`attn_resolutions` and in the middle iff `attn_type == "vanilla"` (our `attention_levels`,
`mid_attention`). transformers holds no decoder, so an imported tokenizer has `has_decoder=False`.
Pixels: Chameleon's image processor feeds x * 0.0078 - 1 (ours x / 127.5 - 1), so the import sets
`pixel_scale` from the checkpoint's preprocessor_config.json (default Chameleon's 0.0078) and
uint8 images through our VQTokenizer get exactly its codes; export writes the processor settings
with our scale (`preprocessor_config`), so transformers' processor gives our codes.

Export of ours: an l2-normalised lookup is written with the normalised codebook: with unit-norm
codes, the Euclidean nearest code of z is the code of largest z.e, the same as the cosine-nearest
code of z/|z|, so the codes are the same (the pre-quantisation latents are not: ours are
normalised). Our decoder is not exported (transformers has nowhere to put it).

Pure numpy: conv kernels torch [out, in, kh, kw] <-> ours [kh, kw, in, out]; 1x1 convs <-> our
Dense kernels [in, out].
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np
from flax import traverse_util

from cm3leon_jax import vqgan

VQ_PREFIX = "model.vqmodel."
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # transformers' image processor settings
_GROUPS = 32  # torch.nn.GroupNorm(num_groups=32) in every Chameleon block
_INNER = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "shortcut": "nin_shortcut",
          "norm": "norm", "q": "q", "k": "k", "v": "v", "proj_out": "proj_out"}
_TOP = {"mid_res0": "mid.block_1", "mid_attn": "mid.attn_1", "mid_res1": "mid.block_2", "conv_in": "conv_in",
        "conv_out": "conv_out", "norm_out": "norm_out"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def vq_prefix(keys) -> str | None:
    """The prefix of the checkpoint's VQ tensors ("model.vqmodel." or "vqmodel."), None without."""
    for k in keys:
        if k.endswith("vqmodel.quantize.embedding.weight"):
            return k[:-len("quantize.embedding.weight")]
    return None


def pixel_scale_from_hf(preprocessor: dict | None) -> float:
    """Our `pixel_scale` for a checkpoint's preprocessor_config.json (None: Chameleon's processor
    defaults, rescale 0.0078 then normalise with mean 1, std 1, i.e. x * 0.0078 - 1). ValueError
    when its normalisation is not of our form x * scale - 1."""
    p = dict(preprocessor or {})
    scale = float(p.get("rescale_factor", vqgan.CHAMELEON_PIXEL_SCALE))
    mean, std = p.get("image_mean", [1.0] * 3), p.get("image_std", [1.0] * 3)
    if not p.get("do_rescale", True) or not p.get("do_normalize", True) or \
            any(float(m) != 1.0 for m in mean) or any(float(s) != 1.0 for s in std):
        raise ValueError(f"{PREPROCESSOR_CONFIG}: do_rescale={p.get('do_rescale', True)}, do_normalize="
                         f"{p.get('do_normalize', True)}, image_mean={mean}, image_std={std}; our VQ tokenizer takes "
                         "pixels as x * pixel_scale - 1 only (Chameleon's: rescale, then mean 1 and std 1)")
    return scale


def preprocessor_config(cfg: vqgan.VQGANConfig) -> dict:
    """Chameleon's image processor settings (preprocessor_config.json) that give transformers the
    pixels our tokenizer encodes: rescale by our `pixel_scale`, minus 1, at our image size, resized
    bicubic (resample 3) as `images.center_crop_resize` (Chameleon's own default, 1, is Lanczos)."""
    size = int(cfg.image_size)
    return dict(image_processor_type="ChameleonImageProcessor", processor_class="ChameleonProcessor",
                do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=float(cfg.pixel_scale),
                do_normalize=True, image_mean=[1.0, 1.0, 1.0], image_std=[1.0, 1.0, 1.0], do_convert_rgb=True)


def config_from_hf(vq: dict, pixel_scale: float = vqgan.CHAMELEON_PIXEL_SCALE) -> vqgan.VQGANConfig:
    """Our VQGANConfig (encoder only) for a transformers `vq_config` (and the image processor's
    `pixel_scale_from_hf`); ValueError naming what our VQGAN cannot compute."""
    mults = tuple(int(m) for m in vq.get("channel_multiplier", (1, 1, 2, 2, 4)))
    base, res = int(vq.get("base_channels", 128)), int(vq.get("resolution", 512))
    attn_type = vq.get("attn_type", "vanilla")
    problems = []
    if vq.get("double_latent"):
        problems.append("double_latent=True")
    if mults and mults[0] != 1:
        problems.append(f"channel_multiplier[0]={mults[0]} (our encoder's first level has `channels` inputs only "
                        "when its multiplier is 1)")
    if attn_type not in ("vanilla", None, "none"):
        problems.append(f"attn_type={attn_type!r} (ours: vanilla attention or none)")
    if any(base * m % _GROUPS for m in (1,) + mults):
        problems.append(f"widths {[base * m for m in mults]} not multiples of {_GROUPS} (GroupNorm groups)")
    if problems:
        raise ValueError("this Chameleon VQ cannot be imported exactly: " + "; ".join(problems))
    vanilla = attn_type == "vanilla"
    levels = tuple(i for i in range(len(mults)) if vanilla and res // 2 ** i in (vq.get("attn_resolutions") or ()))
    return vqgan.VQGANConfig(
        image_size=res, in_channels=int(vq.get("in_channels", 3)), channels=base, channel_multipliers=mults,
        num_res_blocks=int(vq.get("num_res_blocks", 2)), attention_at_lowest=vanilla, attention_levels=levels,
        mid_attention=vanilla, codebook_size=int(vq.get("num_embeddings", 8192)), code_dim=int(vq.get("embed_dim", 256)),
        embed_dim=int(vq.get("latent_channels", 256)), commitment_beta=float(vq.get("beta", 0.25)),
        l2_normalize_codes=False, num_groups=_GROUPS, has_decoder=False, pixel_scale=float(pixel_scale))


def hf_config(cfg: vqgan.VQGANConfig) -> dict:
    """transformers' `vq_config` for our VQGANConfig; ValueError naming what Chameleon cannot hold."""
    levels = [i for i in range(len(cfg.channel_multipliers)) if cfg.has_level_attention(i)]
    problems = []
    if cfg.channel_multipliers[0] != 1:
        problems.append(f"channel_multipliers[0]={cfg.channel_multipliers[0]} (Chameleon's conv_in has base_channels "
                        "outputs)")
    widths = [cfg.channels * m for m in (1,) + tuple(cfg.channel_multipliers)]
    if vqgan._groups(cfg.channels, cfg.num_groups) != _GROUPS or any(w % _GROUPS for w in widths):
        problems.append(f"GroupNorm groups: num_groups={cfg.num_groups}, widths {widths} (Chameleon: 32 groups)")
    if cfg.norm != "group":
        problems.append(f"norm={cfg.norm!r} (Chameleon normalises with GroupNorm)")
    if cfg.patch_size != 1:
        problems.append(f"patch_size={cfg.patch_size} (Chameleon's encoder convolves full-resolution pixels)")
    if levels and not cfg.has_mid_attention:
        problems.append("level attention without mid attention (Chameleon ties both to attn_type)")
    if cfg.local_encoder:   # written anyway, transformers encoded the whole image: other codes
        problems.append("local_encoder=True (Chameleon's encoder sees the whole image, ours each token's own patch)")
    if problems:
        raise ValueError("this VQ tokenizer cannot be written as Chameleon's ChameleonVQVAE: " + "; ".join(problems))
    return dict(model_type="chameleon_vqgan", embed_dim=cfg.code_dim, num_embeddings=cfg.codebook_size,
                double_latent=False, latent_channels=cfg.embed_dim, resolution=cfg.image_size,
                in_channels=cfg.in_channels, base_channels=cfg.channels,
                channel_multiplier=list(cfg.channel_multipliers), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=[cfg.image_size // 2 ** i for i in levels], dropout=0.0,
                attn_type="vanilla" if cfg.has_mid_attention else "none")


def hf_name(path: tuple[str, ...]) -> str:
    """transformers name (without the vqmodel prefix) of one of our encoder/quantizer params."""
    if path[0] == "quantizer":
        if path[1] == "codebook":
            return "quantize.embedding.weight"
        return {"quant_proj": "quant_conv", "post_quant_proj": "post_quant_conv"}[path[1]] + "." + _LEAF[path[-1]]
    if path[0] != "encoder":
        raise ValueError(f"{'/'.join(path)}: only the encoder and quantizer have Chameleon counterparts")
    module = path[1]
    if m := re.fullmatch(r"down(\d+)_(res|attn)(\d+)", module):
        base = f"down.{m[1]}.{'block' if m[2] == 'res' else 'attn'}.{m[3]}"
    elif m := re.fullmatch(r"down(\d+)_downsample", module):
        base = f"down.{m[1]}.downsample.conv"
    else:
        base = _TOP[module]
    return ".".join(["encoder", base, *(_INNER[p] for p in path[2:-1]), _LEAF[path[-1]]])


def from_hf(t: np.ndarray, ndim: int) -> np.ndarray:
    t = np.asarray(t, np.float32)
    if t.ndim == 4:
        return t[:, :, 0, 0].T if ndim == 2 else t.transpose(2, 3, 1, 0)
    return t


def to_hf(x: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if path[-1] == "kernel" and x.ndim == 2:  # Dense kernel [in, out] -> 1x1 conv [out, in, 1, 1]
        return x.T[:, :, None, None]
    return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x


def _encoder_shapes(cfg: vqgan.VQGANConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax
    enc = dataclasses.replace(cfg, has_decoder=False)
    shapes = jax.eval_shape(lambda: vqgan.init_params(jax.random.key(0), enc))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def params_from_hf(get: Callable[[str], np.ndarray], keys, cfg: vqgan.VQGANConfig, prefix: str = VQ_PREFIX) -> dict:
    """Our (encoder-only) params from the checkpoint's `prefix*` tensors; ValueError listing every
    missing, unexpected or misshapen tensor."""
    hf_keys = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    flat, problems, used = {}, [], set()
    for path, shape in _encoder_shapes(cfg).items():
        name = hf_name(path)
        if name not in hf_keys:
            problems.append(f"missing tensor {prefix}{name}")
            continue
        used.add(name)
        x = from_hf(get(prefix + name), len(shape))
        if x.shape != shape:
            problems.append(f"tensor {prefix}{name} has shape {tuple(np.shape(get(prefix + name)))}, which does not "
                            f"fit our {'/'.join(path)} {shape} of the vq_config")
            continue
        flat[path] = x
    extra = sorted(hf_keys - used)
    if extra:
        problems.append(f"tensors the vq_config does not describe: {[prefix + k for k in extra[:8]]}")
    if problems:
        raise ValueError("Chameleon VQ tensors do not match its vq_config: " + "; ".join(problems[:12]))
    return traverse_util.unflatten_dict(flat)


def hf_tensors(params, cfg: vqgan.VQGANConfig, prefix: str = VQ_PREFIX) -> list[tuple[str, np.ndarray]]:
    """(name, float32 tensor) of Chameleon's vqmodel for our params (encoder and quantizer; the
    codebook l2-normalised when our lookup is, see the module doc)."""
    hf_config(cfg)  # refuses what Chameleon cannot hold
    flat = traverse_util.flatten_dict({k: params[k] for k in ("encoder", "quantizer")})
    out = []
    for path, x in sorted(flat.items(), key=lambda kv: hf_name(kv[0])):
        x = np.asarray(x, np.float32)
        if path == ("quantizer", "codebook") and cfg.l2_normalize_codes:
            x = np.asarray(vqgan.l2_normalize(x))
        out.append((prefix + hf_name(path), to_hf(x, path)))
    return out
