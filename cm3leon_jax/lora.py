"""Low-rank adapters (LoRA): fine-tune a large model by training a small update to its projections.

A projection y = x W becomes y = x W + (alpha / rank) (x A) B, where A maps the kernel's input
axes to `rank` and B maps `rank` to its output axes. B starts at zero, so a fresh adapter leaves
the pretrained model's outputs exactly as they were. The trainer differentiates the adapters
only: the frozen weights get no gradient (the backward pass computes no weight gradients for
them, about a third of a step's matmul FLOPs) and no optimizer state (Adam's two moments of a 7B
model are 56 GB in float32). Merging folds each adapter into its kernel (W + (alpha / rank) A B),
after which the model is the plain architecture again: export and decoding merge first, so an
adapted model runs at exactly the base model's cost.

The pieces are pure functions over parameter trees; `model.Projection` owns the parameters.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cm3leon_jax.quantization import is_int8

# Projections an adapter may attach to (`model.lora_targets`, comma-separated): the attention's
# query/key/value/out and the MLP's up/gate/down. Embeddings, norms and the output head stay frozen.
TARGETS = ("query", "key", "value", "out", "up", "gate", "down")
ADAPTER_PARAMS = ("lora_a", "lora_b")
_MAX_SCALE = float(np.finfo(np.float32).max)   # the largest adapter scale float32 holds
_RANK = "r"   # the einsum letter of the adapter's rank axis (checked unused by the equation)


def parse_targets(spec: str) -> tuple[str, ...]:
    """"query,value" -> ("query", "value"); an unknown name is a ValueError listing the known ones. A
    repeated name counts once (it adapts its projection once; flops.py counted it twice)."""
    names = tuple(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        raise ValueError(f"model.lora_targets names {unknown}: not projections; known: {', '.join(TARGETS)}")
    return names


def validate(rank: int, alpha: float, targets: str) -> None:
    if rank < 0:
        raise ValueError(f"model.lora_rank={rank} must be >= 0 (0: no adapters)")
    if rank and not parse_targets(targets):
        raise ValueError("model.lora_rank > 0 needs model.lora_targets to name at least one projection")
    # the scale is applied in the parameters' float32: an infinite one (alpha = inf, or 1e39 / rank) turns
    # a fresh adapter's B = 0 into 0 * inf = NaN, and the model's outputs with it
    if rank and not 0 < alpha / rank <= _MAX_SCALE:
        raise ValueError(f"model.lora_alpha={alpha} must be > 0 and finite (the adapter's scale is alpha / rank, "
                         f"at most {_MAX_SCALE:.3g})")


def scale(rank: int, alpha: float) -> float:
    return float(alpha) / float(rank)


def adapter_equations(equation: str) -> tuple[str, str, int]:
    """A projection's einsum ("bld,dhk->blhk") -> (x A's, (x A) B's, number of input axes). A takes
    the kernel's axes that x shares (its inputs) to the rank; B takes the rank to the rest."""
    inputs, out = equation.split("->")
    x, kernel = inputs.split(",")
    if _RANK in equation:
        raise ValueError(f"projection equation {equation!r} already uses {_RANK!r}")
    contracted = "".join(c for c in kernel if c in x)
    produced = "".join(c for c in kernel if c not in x)
    if kernel != contracted + produced:
        raise ValueError(f"projection equation {equation!r}: the kernel's input axes must come first")
    kept = "".join(c for c in x if c not in contracted)
    return f"{x},{contracted}{_RANK}->{kept}{_RANK}", f"{kept}{_RANK},{_RANK}{produced}->{out}", len(contracted)


def is_adapter(path: tuple) -> bool:
    return str(path[-1]) in ADAPTER_PARAMS


def split(params: Any) -> tuple[Any, Any]:
    """(adapters, everything else) of a parameter tree (or any tree shaped like it: shardings,
    abstract shapes), each a nested dict; `join` puts them back together."""
    flat = traverse_util.flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    frozen = {k: v for k, v in flat.items() if not is_adapter(k)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(frozen)


def join(adapters: Any, frozen: Any) -> Any:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(adapters)})


def merge_params(params: Any, rank: int, alpha: float) -> Any:
    """The tree with every adapter folded into its kernel (W + alpha / rank * A B, computed in float32,
    in the wider of the two dtypes) and removed: the parameters of the same model without adapters
    (model.lora_rank = 0)."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for path in [k for k in flat if k[-1] == "lora_a"]:
        owner = path[:-1]
        out[owner + ("kernel",)] = _merged_kernel(flat[owner + ("kernel",)], flat[path], flat[owner + ("lora_b",)],
                                                  scale(rank, alpha))
    return traverse_util.unflatten_dict(out)


def merge_params_like(params: Any, rank: int, alpha: float, abstract: Any) -> Any:
    """`merge_params`, each array given the dtype and sharding of its `abstract` counterpart
    (ShapeDtypeStructs): the plain model's parameters laid out as a run holds them."""
    return jax.tree_util.tree_map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding),
                                  merge_params(params, rank, alpha), abstract)


@jax.jit
def _merged_kernel(kernel, a, b, factor):
    # kernel [lead..., in..., out...], a [lead..., in..., r], b [lead..., r, out...] (lead: a scanned stack's layers)
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    n_in = a.ndim - 1 - lead
    lead_shape, in_shape, out_shape = kernel.shape[:lead], kernel.shape[lead:lead + n_in], kernel.shape[lead + n_in:]
    a2 = a.reshape(*lead_shape, -1, a.shape[-1]).astype(jnp.float32)
    b2 = b.reshape(*lead_shape, b.shape[lead], -1).astype(jnp.float32)
    delta = jnp.matmul(a2, b2).reshape(*lead_shape, *in_shape, *out_shape)
    # the wider of the kernel's and the adapters' dtypes: a LoRA run keeps a bfloat16 copy of float32 weights
    return (kernel.astype(jnp.float32) + factor * delta).astype(jnp.promote_types(kernel.dtype, a.dtype))


def count(params: Any) -> tuple[int, int]:
    """(adapter parameters, all parameters) of a tree (arrays or ShapeDtypeStructs; an int8 kernel
    counts its weights, not its scales)."""
    adapters, _ = split(params)
    size = lambda tree: int(sum((x.values if is_int8(x) else x).size
                                for x in jax.tree_util.tree_leaves(tree, is_leaf=is_int8)))
    return size(adapters), size(params)
