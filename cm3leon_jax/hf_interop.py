"""Hugging Face interoperability: configs, tensor names and layouts between our Transformer and
transformers' `OPTForCausalLM` (the CM3Leon/metaseq architecture) and
`ChameleonForConditionalGeneration` (Chameleon / Anole).

Everything here is numpy and JSON: configs are written as plain dicts, parameters move through
pure per-layer transforms (our scanned params are unstacked along their leading `layers` axis;
q/k/v kernels [d, heads, head_dim] <-> torch Linear weights [heads*head_dim, d]; the attention
output [heads, head_dim, d] <-> [d, heads*head_dim]; other kernels [in, out] <-> [out, in]), and
safetensors files are read through memory maps and written tensor by tensor, so no step holds a
whole model. This is the only module that imports torch or transformers, and only inside the
functions at the end (`load_hf_model`, `hf_logits`, `random_hf_model`) that need them.

What each format can hold exactly:
  * OPT: LayerNorm without parameters (exported as weight 1, bias 0), no biases (exported as 0),
    learned positions (OPT's table has max_length + 2 rows; rows 0-1 are OPT's offset), ReLU or
    tanh-GELU ("gelu_new"), pre-norm, untied or tied head. Not: rotary, QK-norm, RMSNorm, Swin
    placement, SwiGLU, a head_dim other than d_model // heads.
  * Chameleon: RMSNorm with weight, SwiGLU, rotary (half-split rotate_half, as ours), QK-norm as a
    LayerNorm over head_dim with a per-head weight and bias [heads, head_dim] (our
    `qk_norm_params`; without them exported as 1 and 0), pre or Swin norm placement, untied or
    tied head. Not: learned positions, parameter-free LayerNorm, ReLU/GELU, no QK-norm.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Callable, Iterable, Sequence

import numpy as np

from cm3leon_jax import lora, model as model_lib

OPT, CHAMELEON = "hf-opt", "hf-chameleon"
FORMATS = (OPT, CHAMELEON)
MODEL_TYPES = {"opt": OPT, "chameleon": CHAMELEON}
NORM_EPS = 1e-5  # our LayerNorm, RMSNorm and QK-norm epsilon (attention.py)


# ----------------------------------------------------------------------------- configs


def check_exportable(cfg: model_lib.TransformerConfig, fmt: str) -> None:
    """Raises ValueError listing every choice of `cfg` that `fmt` cannot hold exactly."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    problems = []
    if cfg.head_dim and cfg.head_dim * cfg.num_heads != cfg.d_model:
        problems.append(f"head_dim={cfg.head_dim} with num_heads * head_dim != d_model={cfg.d_model} "
                        "(transformers derives head_dim = hidden_size // num_heads)")
    if fmt == OPT:
        if cfg.positions != "learned":
            problems.append(f"positions={cfg.positions!r} (OPT has learned absolute positions only)")
        if cfg.qk_norm:
            problems.append("qk_norm=True (OPT attention has no QK-norm)")
        if cfg.norm != "layernorm":
            problems.append(f"norm={cfg.norm!r} (OPT uses LayerNorm)")
        if cfg.norm_placement != "pre":
            problems.append(f"norm_placement={cfg.norm_placement!r} (exported OPT is pre-norm)")
        if cfg.mlp not in ("relu", "gelu"):
            problems.append(f"mlp={cfg.mlp!r} (OPT's FFN is fc1 -> activation -> fc2, no gate)")
    else:
        if cfg.positions != "rotary":
            problems.append(f"positions={cfg.positions!r} (Chameleon uses rotary positions)")
        if not cfg.qk_norm:
            problems.append("qk_norm=False (Chameleon always applies QK-norm)")
        if cfg.norm != "rmsnorm":
            problems.append(f"norm={cfg.norm!r} (Chameleon uses RMSNorm with a weight)")
        if cfg.mlp != "swiglu":
            problems.append(f"mlp={cfg.mlp!r} (Chameleon's MLP is SwiGLU)")
    if problems:
        name = "OPTForCausalLM" if fmt == OPT else "ChameleonForConditionalGeneration"
        raise ValueError(f"this model cannot be exported as {fmt} ({name}) exactly: " + "; ".join(problems))


def hf_config(cfg: model_lib.TransformerConfig, fmt: str, *, vocabulary_map: dict | None = None,
              dtype: str = "float32", pad_id: int = 0, eos_id: int = 1) -> dict:
    """The transformers config.json (a plain dict) for our model config. Ids: our <pad> is 0 and
    documents start and end with <eos> (1), so bos = eos = 1."""
    check_exportable(cfg, fmt)
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_length,
                  tie_word_embeddings=bool(cfg.tie_embeddings), pad_token_id=pad_id, bos_token_id=eos_id,
                  eos_token_id=eos_id, use_cache=True, torch_dtype=torch_dtype, dtype=torch_dtype)
    if fmt == OPT:
        return dict(common, model_type="opt", architectures=["OPTForCausalLM"], ffn_dim=cfg.d_ff,
                    do_layer_norm_before=True, _remove_final_layer_norm=False, word_embed_proj_dim=cfg.d_model,
                    activation_function="relu" if cfg.mlp == "relu" else "gelu_new",  # jax.nn.gelu is the tanh form
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                    enable_bias=True, layer_norm_elementwise_affine=True, init_std=cfg.init_std)
    rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    return dict(common, model_type="chameleon", architectures=["ChameleonForConditionalGeneration"],
                intermediate_size=cfg.d_ff, num_key_value_heads=cfg.num_heads, hidden_act="silu",
                rms_norm_eps=NORM_EPS, rope_theta=float(cfg.rotary_base), rope_parameters=rope,
                rope_scaling=None, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                model_parallel_size=1, swin_norm=cfg.norm_placement == "swin",
                vocabulary_map=dict(vocabulary_map or {}), initializer_range=cfg.init_std)


def model_fields_from_hf(hf: dict) -> tuple[str, dict]:
    """(format, our model config fields) for a transformers config.json; ValueError where the
    checkpoint holds something our model cannot compute exactly."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json model_type={model_type!r}: only {sorted(MODEL_TYPES)} can be imported")
    fmt = MODEL_TYPES[model_type]
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    problems = []
    if d % heads:
        problems.append(f"hidden_size={d} not divisible by num_attention_heads={heads}")
    fields = dict(vocab_size=int(hf["vocab_size"]), num_layers=int(hf["num_hidden_layers"]), d_model=d,
                  num_heads=heads, max_length=int(hf["max_position_embeddings"]),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", fmt == OPT)), head_dim=0)
    if fmt == OPT:
        if not hf.get("do_layer_norm_before", True):
            problems.append("do_layer_norm_before=False (post-norm OPT-350m style is not supported)")
        if hf.get("_remove_final_layer_norm", False):
            problems.append("_remove_final_layer_norm=True")
        proj = hf.get("word_embed_proj_dim") or d
        if int(proj) != d:
            problems.append(f"word_embed_proj_dim={proj} != hidden_size={d} (project_in/out not supported)")
        act = hf.get("activation_function", "relu")
        if act not in ("relu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            problems.append(f"activation_function={act!r} (ours: relu or tanh-approximated gelu)")
        fields.update(d_ff=int(hf["ffn_dim"]), positions="learned", norm="layernorm", norm_placement="pre",
                      qk_norm=False, mlp="relu" if act == "relu" else "gelu")
    else:
        kv = hf.get("num_key_value_heads") or heads
        if int(kv) != heads:
            problems.append(f"num_key_value_heads={kv} != num_attention_heads={heads} (no grouped-query attention)")
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hf.get('hidden_act')!r} (ours: SwiGLU with silu)")
        eps = float(hf.get("rms_norm_eps", NORM_EPS))
        if abs(eps - NORM_EPS) > 1e-12:
            problems.append(f"rms_norm_eps={eps} (ours is fixed at {NORM_EPS})")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            problems.append("attention_bias/mlp_bias=True (our projections have no biases)")
        if int(hf.get("model_parallel_size", 1) or 1) != 1:
            problems.append(f"model_parallel_size={hf.get('model_parallel_size')} (convert to 1 first)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type != "default":
            problems.append(f"rope_type={rope_type!r} (ours: default rotary)")
        theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or hf.get("rope_theta") or 10000.0
        fields.update(d_ff=int(hf["intermediate_size"]), positions="rotary", rotary_base=float(theta), norm="rmsnorm",
                      norm_placement="swin" if hf.get("swin_norm") else "pre", qk_norm=True, qk_norm_params=True,
                      mlp="swiglu")
    if problems:
        raise ValueError(f"this {model_type} checkpoint cannot be imported exactly: " + "; ".join(problems))
    return fmt, fields


def training_config_from_hf(hf: dict, seq_len: int | None = None):
    """A full training config (config_defaults.base_config) for a transformers config.json."""
    from cm3leon_jax.config_defaults import base_config
    fmt, fields = model_fields_from_hf(hf)
    config = base_config()
    config.model.update(fields)
    length = int(seq_len or min(fields["max_length"], 4096))
    config.data.update(seq_len=length, max_doc_length=length)
    if fmt == CHAMELEON:
        config.z_loss_weight = 1e-5
        config.optimizer.update(peak_lr=1e-4)
    model_lib.TransformerConfig.from_config(config.model)  # validates
    return config


# ----------------------------------------------------------------------------- tensor maps


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One transformers tensor and where it lives in our params.

    `hf_name` may contain `{i}` (the layer). `ours` is the path inside one layer (layered) or in
    the top-level params; None for tensors our model does not have, which are exported as the
    constant `kind` ("zeros"/"ones") and on import must equal it exactly."""
    hf_name: str
    ours: tuple[str, ...] | None
    kind: str  # copy | linear | qkv | out | opt_positions | zeros | ones
    layered: bool
    hf_shape: tuple[int, ...]

    def name(self, layer: int | None = None) -> str:
        return self.hf_name.format(i=layer) if self.layered else self.hf_name


def tensor_specs(cfg: model_lib.TransformerConfig, fmt: str, *, prefix: str | None = None) -> list[TensorSpec]:
    """Every transformers tensor of the format for `cfg`, in file order (embeddings, layers, head)."""
    check_exportable(cfg, fmt)
    d, h, hd, f, v = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size
    specs: list[TensorSpec] = []

    def add(name, ours, kind, shape, layered=False):
        specs.append(TensorSpec(name, ours, kind, layered, tuple(shape)))

    if fmt == OPT:
        p = "model.decoder." if prefix is None else prefix
        add(p + "embed_tokens.weight", ("token_embedding",), "copy", (v, d))
        add(p + "embed_positions.weight", ("position_embedding",), "opt_positions", (cfg.max_length + 2, d))
        L = p + "layers.{i}."
        for name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            add(L + f"self_attn.{name}.weight", ("attention", ours, "kernel"), "qkv", (h * hd, d), True)
            add(L + f"self_attn.{name}.bias", None, "zeros", (h * hd,), True)
        add(L + "self_attn.out_proj.weight", ("attention", "out", "kernel"), "out", (d, h * hd), True)
        add(L + "self_attn.out_proj.bias", None, "zeros", (d,), True)
        add(L + "self_attn_layer_norm.weight", None, "ones", (d,), True)
        add(L + "self_attn_layer_norm.bias", None, "zeros", (d,), True)
        add(L + "fc1.weight", ("mlp", "up", "kernel"), "linear", (f, d), True)
        add(L + "fc1.bias", None, "zeros", (f,), True)
        add(L + "fc2.weight", ("mlp", "down", "kernel"), "linear", (d, f), True)
        add(L + "fc2.bias", None, "zeros", (d,), True)
        add(L + "final_layer_norm.weight", None, "ones", (d,), True)
        add(L + "final_layer_norm.bias", None, "zeros", (d,), True)
        add(p + "final_layer_norm.weight", None, "ones", (d,))
        add(p + "final_layer_norm.bias", None, "zeros", (d,))
    else:
        p = "model." if prefix is None else prefix
        add(p + "embed_tokens.weight", ("token_embedding",), "copy", (v, d))
        L = p + "layers.{i}."
        for name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            add(L + f"self_attn.{name}.weight", ("attention", ours, "kernel"), "qkv", (h * hd, d), True)
        add(L + "self_attn.o_proj.weight", ("attention", "out", "kernel"), "out", (d, h * hd), True)
        for hf_norm, ours in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
            if cfg.qk_norm_params:
                add(L + f"self_attn.{hf_norm}.weight", ("attention", ours, "scale"), "copy", (h, hd), True)
                add(L + f"self_attn.{hf_norm}.bias", ("attention", ours, "bias"), "copy", (h, hd), True)
            else:
                add(L + f"self_attn.{hf_norm}.weight", None, "ones", (h, hd), True)
                add(L + f"self_attn.{hf_norm}.bias", None, "zeros", (h, hd), True)
        add(L + "mlp.gate_proj.weight", ("mlp", "gate", "kernel"), "linear", (f, d), True)
        add(L + "mlp.up_proj.weight", ("mlp", "up", "kernel"), "linear", (f, d), True)
        add(L + "mlp.down_proj.weight", ("mlp", "down", "kernel"), "linear", (d, f), True)
        # pre: input_layernorm before attention, post_attention_layernorm before the MLP; swin: after
        # each sublayer. Both are our attention_norm / mlp_norm.
        add(L + "input_layernorm.weight", ("attention_norm", "scale"), "copy", (d,), True)
        add(L + "post_attention_layernorm.weight", ("mlp_norm", "scale"), "copy", (d,), True)
        add(p + "norm.weight", ("final_norm", "scale"), "copy", (d,))
    if not cfg.tie_embeddings:
        add("lm_head.weight", ("output_head", "kernel"), "linear", (v, d))
    return specs


def to_hf(kind: str, x: np.ndarray, cfg: model_lib.TransformerConfig) -> np.ndarray:
    """One of our (per-layer) arrays -> the transformers tensor."""
    d = cfg.d_model
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "qkv":
        return x.reshape(d, -1).T
    if kind == "out":
        return x.reshape(-1, d).T
    if kind == "opt_positions":
        return np.concatenate([np.zeros((2, x.shape[1]), x.dtype), x], axis=0)
    raise ValueError(f"no array transform for kind {kind!r}")


def from_hf(kind: str, t: np.ndarray, cfg: model_lib.TransformerConfig) -> np.ndarray:
    """A transformers tensor -> our (per-layer) array; a view where numpy can (memmap-friendly:
    slicing the result reads only the bytes of the slice)."""
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    if kind == "copy":
        return t
    if kind == "linear":
        return t.T
    if kind == "qkv":
        return t.T.reshape(d, h, hd)
    if kind == "out":
        return t.T.reshape(h, hd, d)
    if kind == "opt_positions":
        return t[2:]
    raise ValueError(f"no array transform for kind {kind!r}")


def our_shape(spec: TensorSpec, cfg: model_lib.TransformerConfig) -> tuple[int, ...]:
    return tuple(from_hf(spec.kind, np.empty(spec.hf_shape, np.int8), cfg).shape)


def constant(kind: str, shape, dtype) -> np.ndarray:
    return (np.ones if kind == "ones" else np.zeros)(shape, dtype)


def layer_param(params: dict, cfg: model_lib.TransformerConfig, path: Sequence[str], layer: int | None):
    """Our array for `path` (inside a layer when `layer` is not None); scanned params are sliced
    along their stacked leading axis (one layer at a time, never the whole stack on the host)."""
    if layer is None:
        node = params
        for key in path:
            node = node[key]
        return node
    if cfg.scan_layers:
        node = params["layers"]["layer"]
        for key in path:
            node = node[key]
        return node[layer]
    node = params[f"layer_{layer}"]["layer"]
    for key in path:
        node = node[key]
    return node


# ----------------------------------------------------------------------------- LoRA adapters (PEFT)
# A LoRA run's adapters alone, in the layout Hugging Face PEFT reads on top of the model our hf-*
# export writes: per layer and projection `base_model.model.<module>.lora_A.weight` [rank, in] and
# `.lora_B.weight` [out, rank], where in/out are the torch Linear's flattened input/output axes
# (ours: A [in..., rank], B [rank, out...]), and PEFT's scale lora_alpha / r is ours (alpha / rank).

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """A projection an adapter attaches to: its transformers module (`{i}`: the layer), our
    `lora.TARGETS` name for it and its path inside one of our layers."""
    module: str
    target: str
    path: tuple[str, ...]

    def name(self, layer: int, which: str) -> str:
        """PEFT's tensor name for lora_A ("A") or lora_B ("B") of `layer`."""
        return f"{PEFT_PREFIX}{self.module.format(i=layer)}.lora_{which}.weight"


def adapter_specs(cfg: model_lib.TransformerConfig, fmt: str) -> list[AdapterSpec]:
    """The projections of `fmt`'s layers an adapter may attach to, from its tensor map."""
    return [AdapterSpec(spec.hf_name[:-len(".weight")], spec.ours[-2], spec.ours[:-1])
            for spec in tensor_specs(cfg, fmt)
            if spec.layered and spec.ours and spec.ours[-1] == "kernel" and spec.ours[-2] in lora.TARGETS]


def adapter_to_hf(x: np.ndarray, which: str) -> np.ndarray:
    """One layer's A [in..., r] ("A") or B [r, out...] ("B") -> PEFT's lora_A [r, in] or lora_B [out, r]."""
    return (x.reshape(-1, x.shape[-1]) if which == "A" else x.reshape(x.shape[0], -1)).T


def adapter_from_hf(t: np.ndarray, shape) -> np.ndarray:
    """PEFT's lora_A or lora_B of one layer -> our A or B of that per-layer `shape`."""
    return t.T.reshape(shape)


def peft_config(cfg: model_lib.TransformerConfig, fmt: str, rank: int, alpha: float, targets: Sequence[str],
                base_model: str | None = None) -> dict:
    """PEFT's adapter_config.json for adapters on `targets`. target_modules is a regular expression
    naming exactly the language model's projections (PEFT matches it against whole module names),
    so no other module that happens to share a short name (Chameleon's VQ model) gets an adapter."""
    modules = sorted({re.escape(s.module).replace(re.escape("{i}"), r"\d+")
                      for s in adapter_specs(cfg, fmt) if s.target in targets})
    if not modules:
        raise ValueError(f"model.lora_targets={','.join(targets)!r} names no projection {fmt} has")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
            "target_modules": "(?:" + "|".join(modules) + ")", "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model or None}


# PEFT settings our adapters (x W + alpha / r (x A) B on whole projections, every layer) cannot hold,
# each with the value that means "not used". The LoRA variants that change the forward pass are among
# them: aLoRA (adapters active only after invocation tokens), block-diagonal BD-LoRA, Arrow routing,
# MonteCLoRA sampling, KaSA (which truncates the base weights' SVD) and QALoRA's pooled inputs.
# Initialisation-only or backward-only settings (EVA, VeLoRA, orthogonal, MiCA) do not matter; the
# initialisations that subtract their first adapter from the base weights (_PEFT_BASE_CHANGING) do:
# saved unconverted, such an adapter applies to that changed base (PEFT redoes the change on load).
_PEFT_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                     "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "layer_replication": None,
                     "lora_bias": False, "trainable_token_indices": None, "target_parameters": None,
                     "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None,
                     "monteclora_config": None, "kasa_config": None, "use_qalora": False}


_PEFT_BASE_CHANGING = ("pissa", "olora", "corda", "loftq", "lora_ga")


def adapter_fields_from_peft(peft: dict) -> tuple[int, float]:
    """(rank, our alpha) of a PEFT adapter_config.json; ValueError naming every setting our
    adapters cannot hold exactly. rsLoRA's scale alpha / sqrt(r) is converted to ours exactly."""
    problems = []
    if peft.get("peft_type") != "LORA":
        problems.append(f"peft_type={peft.get('peft_type')!r} (only LORA)")
    for key, unused in _PEFT_UNSUPPORTED.items():
        value = peft.get(key, unused)
        if value != unused and not (unused in ({}, None) and not value):
            problems.append(f"{key}={value!r}")
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_PEFT_BASE_CHANGING):
        problems.append(f"init_lora_weights={init!r} (the adapter applies to base weights PEFT changed at "
                        "initialisation; save it with path_initial_model_for_weight_conversion for a plain LoRA adapter)")
    if problems:
        raise ValueError("this PEFT adapter cannot be imported exactly: " + "; ".join(problems))
    rank, alpha = int(peft["r"]), float(peft["lora_alpha"])
    if peft.get("use_rslora"):
        alpha *= math.sqrt(rank)   # rsLoRA scales by alpha / sqrt(r); ours by alpha / r
    return rank, alpha


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _cast_finite(x: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """`x` as C-order `dtype`; a ValueError when the cast turns finite values into inf (float16's
    range ends at 65504), which numpy would only warn about and the exported model would carry."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(x.astype(dtype, copy=False))
    if out.dtype == x.dtype or out.dtype.name not in ("float16", "bfloat16", "float32"):
        return out
    overflowed = ~np.isfinite(out.astype(np.float32)) & np.isfinite(x.astype(np.float64))
    if overflowed.any():
        import ml_dtypes
        raise ValueError(f"{what}: {int(overflowed.sum())} value(s) (largest magnitude "
                         f"{float(np.abs(x[overflowed].astype(np.float64)).max()):.6g}) overflow {out.dtype.name}, "
                         f"whose largest finite value is {float(ml_dtypes.finfo(out.dtype).max):.6g}: export with "
                         "--dtype bfloat16 or float32")
    return out


def write_safetensors(path: str, entries: Sequence[tuple[str, tuple, str, Callable[[], Iterable[np.ndarray]]]],
                      metadata: dict | None = None) -> str:
    """Writes a safetensors file tensor by tensor; returns its sha256.

    entries: (name, shape, dtype name, producer); the producer yields C-order chunks whose
    concatenation along axis 0 is the tensor (e.g. one layer at a time), so at most one chunk is
    in host memory. Written to PATH.tmp and renamed, so a crash never leaves a truncated file."""
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        size = math.prod(shape) * np_dtype(dtype).itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            for chunk in (len(blob).to_bytes(8, "little"), blob):
                f.write(chunk)
                digest.update(chunk)
            for name, shape, dtype, produce in entries:
                want = np_dtype(dtype)
                rows = 0
                for part in produce():
                    part = _cast_finite(np.asarray(part), want, f"{path}: tensor {name}")
                    if part.ndim != len(shape) or part.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"{path}: tensor {name}: chunk of shape {part.shape} for shape {tuple(shape)}")
                    rows += part.shape[0] if part.ndim else 1
                    data = part.tobytes()
                    f.write(data)
                    digest.update(data)
                if rows != (shape[0] if len(shape) else 1):
                    raise ValueError(f"{path}: tensor {name}: wrote {rows} rows, expected shape {tuple(shape)}")
    except BaseException:   # no half-written PATH.tmp left behind in the export directory
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    return digest.hexdigest()


class SafetensorsFile:
    """A safetensors file read through a memory map: `get(name)` is a lazy numpy view, so reading
    a slice of it reads only that slice's bytes. Malformed headers, unknown dtypes and truncated
    files are ValueErrors naming the file and the tensor."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise ValueError(f"{path}: corrupted safetensors header (length {n} in a {size}-byte file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: corrupted safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupted safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = {}
        for name, e in header.items():
            try:
                dtype = np_dtype(_ST_DTYPES[e["dtype"]])
                shape = tuple(int(s) for s in e["shape"])
                start, stop = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: tensor {name}: bad header entry {e!r} ({err!r})") from None
            if stop - start != math.prod(shape) * dtype.itemsize or start < 0:
                raise ValueError(f"{path}: tensor {name}: data_offsets {start}..{stop} do not hold shape {shape} {dtype}")
            if self._data_start + stop > size:
                raise ValueError(f"{path}: tensor {name} ends at byte {self._data_start + stop} but the file has "
                                 f"{size} bytes (truncated or corrupted)")
            self._entries[name] = (dtype, shape, start, stop)
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, start, stop = self._entries[name]
        raw = self._mm[self._data_start + start:self._data_start + stop]
        return raw.view(dtype).reshape(shape)


class HFCheckpoint:
    """The safetensors weights of a transformers folder: model.safetensors or the shards listed
    in model.safetensors.index.json."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            for name, file in weight_map.items():
                self._where[name] = file
            for file in sorted(set(weight_map.values())):
                self._files[file] = SafetensorsFile(os.path.join(directory, file))
            for name, file in weight_map.items():
                if name not in self._files[file]:
                    raise ValueError(f"{index} lists {name} in {file}, which does not contain it")
        elif os.path.exists(single):
            self._files["model.safetensors"] = SafetensorsFile(single)
            self._where = {name: "model.safetensors" for name in self._files["model.safetensors"].keys()}
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json (found "
                                    f"{found}); convert PyTorch .bin weights with transformers' save_pretrained first")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ValueError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        return self._files[self._where[name]].get(name)


# ----------------------------------------------------------------------------- vocabularies

IMAGE_TOKEN_PREFIX = "IMGIMG"
MAP_FORMAT = "cm3leon_jax.hf_vocab_map/1"
# Our special ids and the spellings that mean them in a transformers vocabulary (ours first,
# then Chameleon's where the meaning matches); <mask> falls back to a reserved token.
SPECIAL_SPELLINGS = {
    "<pad>": ("<pad>",),
    "<eos>": ("<eos>", "</s>"),
    "<break>": ("<break>", "<racm3:break>"),
    "<eoss>": ("<eoss>",),
    "<mask>": ("<mask>",),
}
SENTINEL_SPELLINGS = ("<mask:{i}>", "<sentinel:{i}>")
_RESERVED = re.compile(r"^<reserved\d+>$")
_ALL_SPELLINGS = {s for spellings in SPECIAL_SPELLINGS.values() for s in spellings}


def image_token_name(code: int) -> str:
    """Chameleon's name for image code c: IMGIMG + its decimal digits written A-J + Z."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(ch)) for ch in str(int(code))) + "Z"


def image_token_code(name: str) -> int:
    body = name[len(IMAGE_TOKEN_PREFIX):-1]
    if not name.startswith(IMAGE_TOKEN_PREFIX) or not name.endswith("Z") or not body or \
            any(not "A" <= ch <= "J" for ch in body):
        raise ValueError(f"{name!r} is not a Chameleon image token (IMGIMG<digits as A-J>Z)")
    return int("".join(str(ord(ch) - ord("A")) for ch in body))


def read_hf_vocab(path: str) -> dict[str, int]:
    """{token: id} from a tokenizer vocab.json, a tokenizer.json (model vocab + added tokens), a
    transformers config.json with `vocabulary_map`, or a plain {token: id} JSON mapping file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("vocabulary_map"), dict):
        data = data["vocabulary_map"]
    elif isinstance(data, dict) and isinstance(data.get("model"), dict) and "vocab" in data["model"]:
        vocab = dict(data["model"]["vocab"])
        for tok in data.get("added_tokens", []):
            vocab[tok["content"]] = int(tok["id"])
        data = vocab
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ValueError(f"{path}: expected a {{token: id}} JSON object (vocab.json, tokenizer.json or "
                         "config.json with vocabulary_map)")
    return {str(k): int(v) for k, v in data.items()}


def vocab_mapping(hf_vocab: dict[str, int], vocab_size: int, num_sentinels: int | None = None) -> dict:
    """Maps a transformers BPE vocabulary with image codes inside it (Chameleon/Anole: tokens
    `IMGIMG...Z`) onto our id layout (vocab.py):

        [<pad> <eos> <break> <eoss> <mask>] [<mask:0..S-1>] [text: every other named id, in HF id
        order] [image codes 0..N-1, by code] [unnamed rows up to vocab_size (padding)]

    Our specials take the HF token with the same meaning (SPECIAL_SPELLINGS: ours, or Chameleon's
    </s>, <racm3:break>, <eoss>), sentinels `<mask:i>`/`<sentinel:i>`; any still missing take the
    lowest `<reservedNNNNN>` tokens. num_sentinels=None: as many as the vocabulary spells
    contiguously from 0. Image codes must be exactly 0..N-1.

    Returns a JSON-able dict: hf_to_ours and ours_to_hf (permutations of range(vocab_size)), the
    layout (text_offset, image_offset, ...), and which HF token each special came from."""
    ids = sorted(set(hf_vocab.values()))
    if ids and (ids[0] < 0 or ids[-1] >= vocab_size):
        raise ValueError(f"vocabulary ids span {ids[0]}..{ids[-1]}, outside the model's vocab_size {vocab_size}")
    if len(ids) != len(hf_vocab):
        raise ValueError("the vocabulary maps several tokens to one id")
    name_of = {i: t for t, i in hf_vocab.items()}
    image = {}
    for tok, i in hf_vocab.items():
        if tok.startswith(IMAGE_TOKEN_PREFIX):
            image[image_token_code(tok)] = i
    if image and sorted(image) != list(range(len(image))):
        raise ValueError(f"image codes are not contiguous from 0 (found {len(image)} codes, max {max(image)})")
    taken: set[int] = set(image.values())
    reserved = [i for i in ids if _RESERVED.match(name_of[i])]

    def take(spellings, what):
        for s in spellings:
            if s in hf_vocab and hf_vocab[s] not in taken:
                return hf_vocab[s], s
        for i in reserved:
            if i not in taken:
                return i, name_of[i]
        raise ValueError(f"the vocabulary has no token for {what} (spellings {list(spellings)}) and no free "
                         "<reservedNNNNN> token to use instead")

    sources, specials = {}, []
    for ours, spellings in SPECIAL_SPELLINGS.items():
        i, src = take(spellings, ours)
        taken.add(i)
        specials.append(i)
        sources[ours] = src
    if num_sentinels is None:
        num_sentinels = 0
        while any(s.format(i=num_sentinels) in hf_vocab for s in SENTINEL_SPELLINGS):
            num_sentinels += 1
    for k in range(num_sentinels):
        i, src = take([s.format(i=k) for s in SENTINEL_SPELLINGS], f"sentinel <mask:{k}>")
        taken.add(i)
        specials.append(i)
        sources[f"<mask:{k}>"] = src
    text = [i for i in ids if i not in taken]
    images = [image[c] for c in range(len(image))]
    named = set(ids)
    unnamed = [i for i in range(vocab_size) if i not in named]
    ours_to_hf = specials + text + images + unnamed
    assert sorted(ours_to_hf) == list(range(vocab_size))
    hf_to_ours = [0] * vocab_size
    for ours, hf in enumerate(ours_to_hf):
        hf_to_ours[hf] = ours
    n_spec = 5 + num_sentinels
    layout = dict(num_specials=n_spec, num_sentinels=num_sentinels, text_offset=n_spec, text_size=len(text),
                  image_offset=n_spec + len(text), num_image_codes=len(images),
                  size=n_spec + len(text) + len(images), vocab_size=vocab_size)
    return {"format": MAP_FORMAT, "layout": layout, "special_sources": sources,
            "hf_to_ours": hf_to_ours, "ours_to_hf": ours_to_hf}


def our_vocabulary_map(vocab, vocab_size: int) -> dict[str, int]:
    """Chameleon's config `vocabulary_map` ({token: id}) for one of our `vocab.Vocabulary`s: our
    special spellings, SentencePiece pieces for text, IMGIMG names for image codes (so
    transformers treats them as image tokens); padding rows past vocab.size are left unnamed.
    `vocab_mapping` of the result is the identity."""
    out: dict[str, int] = {}
    for i in range(vocab_size):
        if i >= vocab.size:
            continue  # padding rows stay unnamed (vocab_mapping puts them last)
        if vocab.is_image(i):
            name = image_token_name(i - vocab.image_offset)
        elif vocab.is_special(i):
            name = vocab.token_string(i)
        else:
            name = vocab.token_string(i)
            if name in out or name.startswith(IMAGE_TOKEN_PREFIX) or _RESERVED.match(name) or \
                    name in _ALL_SPELLINGS or re.match(r"^<(mask|sentinel):\d+>$", name):
                name = f"<text{i:05d}>"
        out[name] = i
    return out


# ----------------------------------------------------------------------------- torch side


def interop_import(module: str, *needs: str):
    """Imports an optional interop dependency (after `needs`), or says which extra to install:
    the core never imports torch, transformers or tokenizers at module import time."""
    import importlib
    try:
        for name in needs:
            importlib.import_module(name)
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"this needs the interop extra: pip install 'cm3leon_jax[interop]' "
                          f"({', '.join(needs + (module,))}): {e}") from None


def _transformers():
    return interop_import("transformers", "torch")


def load_hf_model(directory: str):
    """The transformers model of an exported/HF folder, float32, eval mode (for checks)."""
    transformers = _transformers()
    import torch
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f)["model_type"]
    cls = {"opt": transformers.OPTForCausalLM, "chameleon": transformers.ChameleonForConditionalGeneration}[model_type]
    model = cls.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [b, l, V] of a transformers model on unpadded rows (positions 0..l-1)."""
    import torch
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits.float().numpy()


def random_hf_model(fmt: str, hf_cfg: dict, directory: str, *, seed: int = 0, std: float = 0.05) -> None:
    """Saves a randomly initialised transformers model of `hf_cfg` to `directory` (tests). Every
    tensor our model holds is drawn at random (norm weights around 1); OPT's biases stay zero and
    its LayerNorms unit, as transformers initialises them."""
    transformers = _transformers()
    import torch
    torch.manual_seed(seed)
    if fmt == OPT:
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**hf_cfg))
    else:
        model = transformers.ChameleonForConditionalGeneration(transformers.ChameleonConfig(**hf_cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vqmodel" in name:
                continue
            if fmt == OPT and (name.endswith(".bias") or "layer_norm" in name):
                continue
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm = name.endswith("norm.weight") or ".q_norm.weight" in name or ".k_norm.weight" in name
            p.copy_(1.0 + noise if is_norm else noise)
    model.save_pretrained(directory)
