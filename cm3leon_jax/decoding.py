"""Compiled generation: one prefill, then a `lax.scan` (fixed length) or `lax.while_loop` (until
`<eos>`) over a preallocated KV cache. No host round trip per token; one compilation per shape.

Guidance streams (conditional, [image-only,] unconditional) are rows of one batch, so CFG costs
one forward per token, not two. Prompts are left-padded: padded slots have segment 0 and are never
attended, and positions count only real tokens, so rows of different lengths decode together
exactly as they would alone.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cm3leon_jax import sampling
from cm3leon_jax.model import DecodeCache, Transformer, TransformerConfig


LENGTH_BUCKET = 16


def left_pad(prompts: Sequence[Sequence[int]], rows: int | None = None,
             length_multiple: int = LENGTH_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [rows, length], mask [rows, length]), right-aligned; extra rows are empty.
    The length is rounded up to `length_multiple` so prompts of nearby lengths share one compiled
    decoder (padded slots are never attended, so the outputs do not change)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // length_multiple) * length_multiple
    rows = len(prompts) if rows is None else rows
    tokens = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return tokens, mask


def stream_rows(streams: Sequence[Sequence[Sequence[int]]], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One block of rows per guidance stream (conditional first, unconditional last), each block
    padded with empty rows to a multiple of `multiple` (the data-parallel size) so the batch
    splits evenly over the mesh. All streams share one length, so one cache holds them all."""
    batch = len(streams[0])
    if any(len(s) != batch for s in streams):
        raise ValueError("every guidance stream needs one prompt per sample")
    padded = -(-batch // multiple) * multiple
    flat = [p for s in streams for p in s]
    tokens, mask = left_pad(flat)
    out_t = np.zeros((len(streams) * padded, tokens.shape[1]), np.int32)
    out_m = np.zeros_like(out_t)
    for i in range(len(streams)):
        out_t[i * padded:i * padded + batch] = tokens[i * batch:(i + 1) * batch]
        out_m[i * padded:i * padded + batch] = mask[i * batch:(i + 1) * batch]
    return out_t, out_m


def check_fits(model_config: TransformerConfig, prompt_length: int, new_tokens: int) -> None:
    """Learned positions end at max_length: say so before the lookups run past the table (NaN logits).
    `prompt_length` is the longest real prompt (positions count real tokens, not padding)."""
    total = prompt_length + new_tokens
    if model_config.positions == "learned" and total > model_config.max_length:
        raise ValueError(f"prompt of {prompt_length} tokens + {new_tokens} new ones = {total} exceeds the model's "
                         f"max_length={model_config.max_length} (learned positions); use fewer neighbours or a "
                         "shorter prompt")


def _constrain_cache(cache: DecodeCache) -> DecodeCache:
    kv_axes = ("layers", "cache_batch", "cache_length", "cache_heads", "cache_kv")
    return cache.replace(keys=nn.with_logical_constraint(cache.keys, kv_axes),
                         values=nn.with_logical_constraint(cache.values, kv_axes))


def _prefill(model, params, tokens, mask, slots):
    """Runs the prompt once; returns the last real token's logits, the cache and next positions."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = _constrain_cache(DecodeCache.allocate(model.config, tokens.shape[0], slots))
    logits, cache = model.apply({"params": params}, tokens, positions, mask, cache=cache)
    return logits[:, -1], cache, positions[:, -1] + 1


def _step(model, params, cache, token, position):
    """One token per row through the cached model -> next logits."""
    logits, cache = model.apply({"params": params}, token[:, None], position[:, None],
                                jnp.ones_like(token)[:, None], cache=cache)
    return logits[:, 0], _constrain_cache(cache)


def row_keys(rng: jax.Array, rows: int) -> jax.Array:
    """A PRNG key per prompt row. One key is split over the rows; an array of `rows` keys is used as
    given, so a row's draws depend on its own key alone, not on which other prompts share the batch
    (`Generator` keys each prompt by its index: a resumed or re-batched run draws the same).
    Legacy raw keys (`jax.random.PRNGKey`: uint32 [2], or [rows, 2]) are read as the same keys."""
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.random.split(rng, rows)
    if rng.shape != (rows,):
        raise ValueError(f"{rng.shape[0]} keys for {rows} prompt rows")
    return rng


def prompt_keys(seed: int, ids: Sequence[Sequence[int]], rows: int) -> jax.Array:
    """A key per prompt: key(seed) folded with each of the prompt's ids (e.g. caption index, strategy,
    sample), so its draws are the same whatever batch it lands in; rows past len(ids) (padding to
    the mesh) repeat the last key."""
    ids = np.asarray(ids, np.uint32).reshape(len(ids), -1)
    if len(ids) == 0 or len(ids) > rows:
        raise ValueError(f"{len(ids)} prompt ids for {rows} rows")
    ids = np.concatenate([ids, np.repeat(ids[-1:], rows - len(ids), axis=0)])
    seed = int(seed)
    if not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed={seed} must be a 64-bit integer")
    # key(seed) keeps a seed's low 32 bits only (seed 2**32 drew seed 0's samples): fold in the high word
    base = jax.random.key(seed) if 0 <= seed < 2 ** 32 else jax.random.fold_in(jax.random.key(seed % 2 ** 32),
                                                                                 (seed % 2 ** 64) >> 32)

    def one(row_ids):
        key = base
        for j in range(ids.shape[1]):
            key = jax.random.fold_in(key, row_ids[j])
        return key

    return jax.vmap(one)(jnp.asarray(ids))


def _step_keys(keys: jax.Array, t) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)


def _choose(keys, logits, streams, config: sampling.SamplingConfig, allowed: tuple[tuple[int, int], ...] | None):
    """[streams * batch, vocab] logits -> one token per prompt (drawn with its own key), shared by
    all its streams."""
    per_stream = logits.reshape(streams, -1, logits.shape[-1])
    filtered = sampling.next_token_logits(per_stream, config, allowed)
    token = jax.vmap(lambda key, row: sampling.draw(key, row, config.temperature))(keys, filtered)
    return jnp.tile(token, streams)


@functools.partial(jax.jit, static_argnames=("model_config", "streams", "num_tokens", "config", "allowed"))
def generate_fixed(params, tokens, mask, rng, *, model_config: TransformerConfig, streams: int, num_tokens: int,
                   config: sampling.SamplingConfig, allowed: tuple[tuple[int, int], ...] | None = None):
    """Exactly `num_tokens` new tokens per prompt (an image: its token count). tokens/mask hold
    `streams` blocks of rows (conditional first). `rng`: one key, or a key per prompt (`row_keys`).
    Returns (tokens [rows / streams, num_tokens], the conditional stream's log-probabilities of the
    drawn tokens, same shape)."""
    model = Transformer(model_config)
    logits, cache, position = _prefill(model, params, tokens, mask, tokens.shape[1] + num_tokens)

    rows = tokens.shape[0] // streams
    keys = row_keys(rng, rows)

    def body(carry, t):
        logits, cache, position = carry
        token = _choose(_step_keys(keys, t), logits, streams, config, allowed)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits[:rows]), token[:rows, None], axis=-1)[:, 0]
        logits, cache = _step(model, params, cache, token, position)
        return (logits, cache, position + 1), (token[:rows], logprob)

    _, (out, logprobs) = jax.lax.scan(body, (logits, cache, position), jnp.arange(num_tokens))
    return out.T, logprobs.T


@functools.partial(jax.jit, static_argnames=("model_config", "streams", "max_tokens", "config", "allowed"))
def generate_until(params, tokens, mask, rng, stop_id, *, model_config: TransformerConfig, streams: int,
                   max_tokens: int, config: sampling.SamplingConfig, allowed: tuple[tuple[int, int], ...] | None = None):
    """Up to `max_tokens` per prompt, stopping each row at `stop_id` (kept; an id or a sequence of
    ids) and the whole batch when every row has stopped. `rng`: one key, or a key per prompt.
    Empty rows (padding to the mesh) start finished, so they never keep the loop running to
    `max_tokens` after every real row has stopped.
    Returns (tokens [rows / streams, max_tokens] with pad 0 after the stop, lengths [rows / streams])."""
    if max_tokens < 1:   # else XLA's dynamic_update_slice fails on the empty output buffer
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    model = Transformer(model_config)
    logits, cache, position = _prefill(model, params, tokens, mask, tokens.shape[1] + max_tokens)
    rows = tokens.shape[0] // streams
    keys = row_keys(rng, rows)
    out = jnp.zeros((rows, max_tokens), jnp.int32)
    done = mask[:rows].sum(axis=1) == 0
    lengths = jnp.zeros((rows,), jnp.int32)
    stop_ids = jnp.atleast_1d(jnp.asarray(stop_id, jnp.int32))

    def cond(carry):
        t, _, _, _, _, done, _ = carry
        return (t < max_tokens) & ~jnp.all(done)

    def body(carry):
        t, logits, cache, position, out, done, lengths = carry
        token = _choose(_step_keys(keys, t), logits, streams, config, allowed)
        own = jnp.where(done, 0, token[:rows])
        out = jax.lax.dynamic_update_slice(out, own[:, None], (0, t))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(own[:, None] == stop_ids[None, :], axis=1)
        logits, cache = _step(model, params, cache, token, position)
        return t + 1, logits, cache, position + 1, out, done, lengths

    carry = (jnp.zeros((), jnp.int32), logits, cache, position, out, done, lengths)
    _, _, _, _, out, _, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths


@dataclasses.dataclass(frozen=True)
class InterleaveRules:
    """The mixed-modal layout a document must keep (`text <break> image <break> text ...`):
    every image exactly `image_tokens` image ids opened and closed by `<break>`, never two images
    in a row, at most `max_images`, at most `max_text_tokens` per text phase."""
    break_id: int
    eos_id: int
    image_tokens: int
    max_images: int
    max_text_tokens: int

    def budget(self) -> int:
        """Most new tokens a document can take: every image with its two `<break>`s, and a full
        text phase before, between and after them."""
        return self.max_images * (self.image_tokens + 2) + (self.max_images + 1) * self.max_text_tokens


class InterleaveState(NamedTuple):
    """Per row: in an image or not, image ids drawn in the current image, images opened, text ids
    in the current text phase, whether text came since the last image, and finished."""
    in_image: jax.Array
    image_pos: jax.Array
    num_images: jax.Array
    text_run: jax.Array
    after_text: jax.Array
    done: jax.Array

    @classmethod
    def start(cls, rows: int, in_image: bool, done: jax.Array | None = None) -> "InterleaveState":
        zeros = jnp.zeros((rows,), jnp.int32)
        return cls(in_image=jnp.full((rows,), in_image), image_pos=zeros, num_images=zeros + int(in_image),
                   text_run=zeros, after_text=jnp.full((rows,), not in_image),
                   done=jnp.zeros((rows,), bool) if done is None else done)


def interleave_transition(state: InterleaveState, text_token: jax.Array, image_token: jax.Array,
                          rules: InterleaveRules) -> tuple[jax.Array, jax.Array, InterleaveState]:
    """One decoding step of the layout's state machine, given the token drawn from the text ids
    (plus `<break>`, `<eos>`) and the one drawn from the image ids. Returns (the token to emit,
    whether one is emitted, the next state). In an image: its ids, then a forced closing `<break>`.
    In text: a text id is kept (the phase's budget full ends the document); `<break>` opens an
    image after text while `max_images` allows, else ends the document, as `<eos>` does (neither
    kept)."""
    image_full = state.image_pos >= rules.image_tokens
    is_break = text_token == rules.break_id
    opens = ~state.in_image & is_break & state.after_text & (state.num_images < rules.max_images)
    ends_text = ~state.in_image & ((text_token == rules.eos_id) | (is_break & ~opens))
    emit = jnp.where(state.in_image, jnp.where(image_full, rules.break_id, image_token), text_token)
    emitted = ~state.done & ~ends_text
    is_text = emitted & ~state.in_image & ~opens
    closes = emitted & state.in_image & image_full
    text_run = jnp.where(closes | opens, 0, state.text_run + is_text)
    new = InterleaveState(
        in_image=jnp.where(emitted, (state.in_image & ~image_full) | opens, state.in_image),
        image_pos=jnp.where(emitted & state.in_image, state.image_pos + 1, 0),
        num_images=state.num_images + (emitted & opens),
        text_run=text_run,
        after_text=jnp.where(closes, False, state.after_text | is_text),
        done=state.done | ends_text | (is_text & (text_run >= rules.max_text_tokens)))
    return jnp.where(emitted, emit, 0), emitted, new


@functools.partial(jax.jit, static_argnames=("model_config", "rules", "text_config", "image_config", "text_allowed",
                                             "image_allowed", "in_image"))
def generate_interleaved(params, tokens, mask, rng, *, model_config: TransformerConfig, rules: InterleaveRules,
                         text_config: sampling.SamplingConfig, image_config: sampling.SamplingConfig,
                         text_allowed: tuple[tuple[int, int], ...], image_allowed: tuple[tuple[int, int], ...],
                         in_image: bool):
    """Mixed-modal documents, every row on its own through `interleave_transition`, in one prefill
    and one `lax.while_loop` over one KV cache: a phase change costs nothing (no new prefill, no
    recompilation for the longer prompt). `in_image`: the prompts end with an opening `<break>`.
    Empty (padding) rows start finished. `rng`: one key, or a key per prompt. Returns (tokens
    [rows, rules.budget()], pad 0 after each row's end; lengths [rows])."""
    model = Transformer(model_config)
    max_new = rules.budget()
    logits, cache, position = _prefill(model, params, tokens, mask, tokens.shape[1] + max_new)
    rows = tokens.shape[0]
    pairs = jax.vmap(jax.random.split)(row_keys(rng, rows))   # [rows, 2]: text draws, image draws
    text_keys, image_keys = pairs[:, 0], pairs[:, 1]
    state = InterleaveState.start(rows, in_image, done=mask.sum(axis=1) == 0)
    out = jnp.zeros((rows, max_new), jnp.int32)
    lengths = jnp.zeros((rows,), jnp.int32)

    def cond(carry):
        t, _, _, _, _, _, state = carry
        return (t < max_new) & ~jnp.all(state.done)

    def body(carry):
        t, logits, cache, position, out, lengths, state = carry
        text_token = _choose(_step_keys(text_keys, t), logits, 1, text_config, text_allowed)
        image_token = _choose(_step_keys(image_keys, t), logits, 1, image_config, image_allowed)
        token, emitted, state = interleave_transition(state, text_token, image_token, rules)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, t))
        logits, cache = _step(model, params, cache, token, position)
        return t + 1, logits, cache, position + 1, out, lengths + emitted, state

    carry = (jnp.zeros((), jnp.int32), logits, cache, position, out, lengths, state)
    _, _, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths
