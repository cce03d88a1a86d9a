import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cm3leon_jax import decoding, sampling, sharding
from cm3leon_jax.model import DecodeCache, Transformer, TransformerConfig
from tests.helpers import tiny_config

CFG = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=48)
GREEDY = sampling.SamplingConfig(temperature=0.0)


def _model(**opts):
    cfg = TransformerConfig(**CFG, **opts)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return cfg, model, params


@pytest.mark.parametrize("opts", [{}, {"positions": "rotary", "qk_norm": True, "norm_placement": "swin"}])
def test_cached_decoding_matches_full_forward_step_by_step(opts):
    cfg, model, params = _model(**opts)
    prompt = np.array([[5, 9, 3, 17, 2]], np.int32)
    out, logprobs = decoding.generate_fixed(params, prompt, np.ones_like(prompt), jax.random.key(0), model_config=cfg,
                                            streams=1, num_tokens=10, config=GREEDY)
    full = np.concatenate([prompt, np.asarray(out)], axis=1)
    logits = model.apply({"params": params}, full)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    for t in range(10):
        step_logits = log_probs[0, prompt.shape[1] - 1 + t]
        assert int(jnp.argmax(step_logits)) == int(out[0, t])  # greedy = argmax of the full pass
        np.testing.assert_allclose(logprobs[0, t], step_logits[out[0, t]], atol=1e-5)
    # logits of the cache path equal the full pass at every step
    cache = DecodeCache.allocate(cfg, 1, full.shape[1])
    step_logits, cache = model.apply({"params": params}, full[:, :5], cache=cache)
    cached = [step_logits[:, -1]]
    for t in range(5, full.shape[1] - 1):
        lg, cache = model.apply({"params": params}, full[:, t:t + 1], jnp.array([[t]]), jnp.ones((1, 1), jnp.int32), cache=cache)
        cached.append(lg[:, 0])
    np.testing.assert_allclose(np.stack(cached, 1), logits[:, 4:-1], atol=2e-5)


def test_a_write_past_the_cache_slots_is_refused_or_gives_nan_logits():
    """dynamic_update_slice clamps its start, so an overflowing write used to overwrite the last slots."""
    cfg, model, params = _model()
    apply = jax.jit(lambda tokens, at, cache: model.apply({"params": params}, tokens, at, jnp.ones_like(tokens),
                                                          cache=cache))
    with pytest.raises(ValueError, match="7 tokens written at once into a DecodeCache of 6 slots"):
        apply(jnp.ones((1, 7), jnp.int32), jnp.arange(7)[None], DecodeCache.allocate(cfg, 1, 6))
    logits, cache = apply(jnp.ones((1, 5), jnp.int32), jnp.arange(5)[None], DecodeCache.allocate(cfg, 1, 6))
    logits_last, cache = apply(jnp.ones((1, 1), jnp.int32), jnp.array([[5]]), cache)   # the sixth slot: fits
    assert np.isfinite(logits).all() and np.isfinite(logits_last).all()
    overflow, _ = apply(jnp.ones((1, 1), jnp.int32), jnp.array([[6]]), cache)
    assert np.isnan(overflow).all()


def test_batched_prompts_of_different_lengths_match_single_prompts():
    cfg, model, params = _model()
    prompts = [[5, 9, 3], [7, 1, 4, 4, 8, 2, 6], [11]]
    tokens, mask = decoding.left_pad(prompts)
    batched, _ = decoding.generate_fixed(params, tokens, mask, jax.random.key(0), model_config=cfg, streams=1,
                                         num_tokens=6, config=GREEDY)
    for i, p in enumerate(prompts):
        t, m = decoding.left_pad([p], length_multiple=1)  # no bucketing: a different padding
        alone, _ = decoding.generate_fixed(params, t, m, jax.random.key(0), model_config=cfg, streams=1,
                                           num_tokens=6, config=GREEDY)
        np.testing.assert_array_equal(batched[i], alone[0])


def test_cfg_scale_one_equals_conditional_stream_and_guidance_changes_samples():
    cfg, model, params = _model()
    cond, uncond = [[5, 9, 3, 17]], [[4, 3, 17]]
    tokens, mask = decoding.stream_rows([cond, uncond])
    alone_t, alone_m = decoding.left_pad(cond)
    kw = dict(model_config=cfg, num_tokens=8)
    guided_1, _ = decoding.generate_fixed(params, tokens, mask, jax.random.key(3), streams=2,
                                          config=sampling.SamplingConfig(temperature=0.0, cfg_scale=1.0), **kw)
    plain, _ = decoding.generate_fixed(params, alone_t, alone_m, jax.random.key(3), streams=1, config=GREEDY, **kw)
    np.testing.assert_array_equal(guided_1, plain)
    guided_5, _ = decoding.generate_fixed(params, tokens, mask, jax.random.key(3), streams=2,
                                          config=sampling.SamplingConfig(temperature=0.0, cfg_scale=5.0), **kw)
    assert not np.array_equal(guided_5, plain)


def test_restricted_range_seeded_sampling_and_stop_token():
    cfg, model, params = _model()
    tokens, mask = decoding.left_pad([[5, 9, 3], [1, 2]])
    conf = sampling.SamplingConfig(temperature=1.0, top_k=10)
    kw = dict(model_config=cfg, streams=1, num_tokens=12, config=conf, allowed=((40, 64),))
    a, _ = decoding.generate_fixed(params, tokens, mask, jax.random.key(7), **kw)
    b, _ = decoding.generate_fixed(params, tokens, mask, jax.random.key(7), **kw)
    c, _ = decoding.generate_fixed(params, tokens, mask, jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # a legacy raw key (uint32 [2]) is the same one key: with 2 rows it was read as 2 keys and failed in fold_in
    legacy, _ = decoding.generate_fixed(params, tokens, mask, jax.random.PRNGKey(7), **kw)
    np.testing.assert_array_equal(legacy, a)
    assert np.all((np.asarray(a) >= 40) & (np.asarray(a) < 64))
    # while_loop decoding stops each row at its stop id and pads after it
    out, lengths = decoding.generate_until(params, tokens, mask, jax.random.key(0), 1, model_config=cfg, streams=1,
                                           max_tokens=16, config=sampling.SamplingConfig(temperature=1.0))
    out, lengths = np.asarray(out), np.asarray(lengths)
    for row, n in zip(out, lengths):
        assert np.all(row[n:] == 0)
        if n < 16:
            assert row[n - 1] == 1 and 1 not in row[:n - 1]


def test_generate_until_empty_padding_rows_start_finished():
    # rows padded to the mesh (stream_rows(multiple=)) are empty: they used to run on until max_tokens,
    # so the whole batch never stopped early once every real prompt had reached its stop id
    cfg, model, params = _model()
    tokens, mask = decoding.stream_rows([[[5, 9, 3], [7, 1, 4]], [[4, 3], [4, 3]]], multiple=4)  # cond, uncond
    out, lengths = decoding.generate_until(params, tokens, mask, jax.random.key(0), (1, 2, 3), model_config=cfg,
                                           streams=2, max_tokens=12, config=GREEDY, allowed=((1, 4),))  # stop at once
    np.testing.assert_array_equal(lengths, [1, 1, 0, 0])
    assert np.all(np.asarray(out)[:, 1:] == 0) and np.all(np.asarray(out)[:2, 0] > 0)


def test_decoding_is_sharded_on_the_training_mesh():
    from cm3leon_jax import trainer
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    state = t.init_state(0)
    prompts = [[1, 9, 10], [1, 12]]
    tokens, mask = decoding.stream_rows([prompts, [[4], [4]]], multiple=sharding.data_parallel_size(mesh))
    assert tokens.shape[0] == 8  # 2 prompts padded to 4 rows per stream
    with sharding.activate(mesh):
        out, _ = decoding.generate_fixed(state.params, tokens, mask, jax.random.key(0), model_config=t.model_config,
                                         streams=2, num_tokens=5, config=sampling.SamplingConfig(cfg_scale=3.0))
    params = jax.device_get(state.params)
    single, _ = decoding.generate_fixed(params, tokens, mask, jax.random.key(0), model_config=t.model_config,
                                        streams=2, num_tokens=5, config=sampling.SamplingConfig(cfg_scale=3.0))
    np.testing.assert_array_equal(out, single)


def test_prompts_longer_than_learned_positions_fail_up_front():
    cfg = TransformerConfig(**CFG)
    decoding.check_fits(cfg, 40, 8)
    with pytest.raises(ValueError, match="exceeds the model's max_length=48"):
        decoding.check_fits(cfg, 40, 9)
    decoding.check_fits(TransformerConfig(**dict(CFG, positions="rotary")), 40, 9)  # rotary has no table


# a toy mixed-modal layout over CFG's 64 ids: <break> 1, <eos> 2, text 3..31, images 32..63
RULES = decoding.InterleaveRules(break_id=1, eos_id=2, image_tokens=4, max_images=2, max_text_tokens=3)
TEXT_IDS, IMAGE_IDS = ((3, 32), (1, 2), (2, 3)), ((32, 64),)


def _run_transitions(text_script, image_script, rules=RULES, in_image=False):
    """Drives the state machine with scripted draws (one row); returns the emitted tokens."""
    state, out = decoding.InterleaveState.start(1, in_image), []
    for text_token, image_token in zip(text_script, image_script):
        token, emitted, state = decoding.interleave_transition(state, jnp.array([text_token]),
                                                               jnp.array([image_token]), rules)
        if bool(emitted[0]):
            out.append(int(token[0]))
        if bool(state.done[0]):
            return out
    raise AssertionError("the script ran out before the document ended")


def test_interleave_transition_keeps_the_layout_with_scripted_draws():
    img = [40] * 40
    # text, <break> opens an image of exactly 4 ids (the text draws ignored inside it), the closing
    # <break> is forced; text again; <eos> ends without being kept
    assert _run_transitions([5, 6, 1, 7, 7, 7, 7, 7, 8, 2], img) == [5, 6, 1, 40, 40, 40, 40, 1, 8]
    # <break> right after an image (no text between) ends the document
    assert _run_transitions([1, 9, 9, 9, 9, 9, 1], img, in_image=False) == [1, 40, 40, 40, 40, 1]
    # the prompt ended with an opening <break>: an image first, then text
    assert _run_transitions([9] * 5 + [10, 2], img, in_image=True) == [40, 40, 40, 40, 1, 10]
    # max_images: the third <break> ends the document unkept
    script = [5, 1, 0, 0, 0, 0, 0, 6, 1, 0, 0, 0, 0, 0, 7, 1]
    assert _run_transitions(script, img) == [5, 1, 40, 40, 40, 40, 1, 6, 1, 40, 40, 40, 40, 1, 7]
    # a text phase filling max_text_tokens ends the document with its last token kept
    assert _run_transitions([5, 6, 7, 8], img) == [5, 6, 7]
    assert _run_transitions([5, 6, 7], img, rules=decoding.InterleaveRules(1, 2, 4, 2, 2)) == [5, 6]
    # max_images=0: a <break> never opens an image
    assert _run_transitions([5, 1], img, rules=decoding.InterleaveRules(1, 2, 4, 0, 3)) == [5]


def _reference_interleaved(forward, prompt, in_image, rules=RULES):
    """The layout's rules written out on the host over full (uncached) forward passes, greedy.
    `forward`: [1, max_length] tokens -> logits; right padding leaves earlier (causal) logits alone."""
    doc = list(prompt)
    images, pos, after_text, run, new = int(in_image), 0, not in_image, 0, []
    inside = in_image
    text_ok = np.zeros(CFG["vocab_size"], bool)
    for a, b in TEXT_IDS:
        text_ok[a:b] = True
    while len(new) < rules.budget():
        padded = np.zeros((1, CFG["max_length"]), np.int32)
        padded[0, :len(doc)] = doc
        logits = np.asarray(forward(padded))[0, len(doc) - 1]
        if inside:
            token = rules.break_id if pos == rules.image_tokens else 32 + int(np.argmax(logits[32:]))
            pos += 1
            if token == rules.break_id:
                inside, after_text, run = False, False, 0
        else:
            token = int(np.argmax(np.where(text_ok, logits, -np.inf)))
            if token == rules.eos_id:
                break
            if token == rules.break_id:
                if not after_text or images == rules.max_images:
                    break
                inside, pos, images = True, 0, images + 1
            else:
                after_text, run = True, run + 1
        doc.append(token)
        new.append(token)
        if not inside and token != rules.break_id and run == rules.max_text_tokens:
            break
    return new


@pytest.mark.parametrize("in_image", [False, True])
def test_generate_interleaved_matches_the_rules_on_full_forward_passes(in_image):
    cfg, model, params = _model()
    # <break> and <eos> take the head columns of two ids the random model often prefers (ties go to
    # the lower id), so its documents open images, end early and fill text phases
    head = params["output_head"]["kernel"]
    params["output_head"]["kernel"] = head.at[:, 1].set(head[:, 29]).at[:, 2].set(head[:, 24])
    rng = np.random.default_rng(0)
    prompts = [[2, *rng.integers(3, 32, size=n).tolist(), *([1] if in_image else [])] for n in (3, 7, 5, 4, 9, 6)]
    tokens, mask = decoding.left_pad(prompts, rows=8)   # two empty rows: they start finished
    out, lengths = decoding.generate_interleaved(
        params, tokens, mask, jax.random.key(0), model_config=cfg, rules=RULES, text_config=GREEDY,
        image_config=GREEDY, text_allowed=TEXT_IDS, image_allowed=IMAGE_IDS, in_image=in_image)
    out, lengths = np.asarray(out), np.asarray(lengths)
    assert out.shape == (8, RULES.budget()) and list(lengths[6:]) == [0, 0]
    documents, forward = [], jax.jit(lambda t: model.apply({"params": params}, t))
    for i, p in enumerate(prompts):
        expected = _reference_interleaved(forward, p, in_image)
        assert out[i, :lengths[i]].tolist() == expected and not out[i, lengths[i]:].any()
        documents.append(expected)
    # the documents reach max_images, and some end before (a ruled-out case would make this test weak)
    image_counts = [int(np.isin(d, range(32, 64)).sum()) // RULES.image_tokens for d in documents]
    assert max(image_counts) == RULES.max_images and min(image_counts) < RULES.max_images


def test_prompt_keys_make_a_prompts_samples_independent_of_its_batch():
    cfg, model, params = _model()
    prompts = [[5, 9, 3], [7, 1, 4, 4, 8, 2, 6], [11, 12]]
    sampled = sampling.SamplingConfig(temperature=1.0)
    tokens, mask = decoding.left_pad(prompts, rows=4)
    keys = decoding.prompt_keys(7, [[10], [11], [12]], rows=4)
    batched, _ = decoding.generate_fixed(params, tokens, mask, keys, model_config=cfg, streams=1, num_tokens=8,
                                         config=sampled)
    for i, p in enumerate(prompts):
        t, m = decoding.left_pad([p], length_multiple=1)
        alone, _ = decoding.generate_fixed(params, t, m, decoding.prompt_keys(7, [[10 + i]], rows=1), model_config=cfg,
                                           streams=1, num_tokens=8, config=sampled)
        np.testing.assert_array_equal(batched[i], alone[0])
    other_seed, _ = decoding.generate_fixed(params, tokens, mask, decoding.prompt_keys(8, [[10], [11], [12]], rows=4),
                                            model_config=cfg, streams=1, num_tokens=8, config=sampled)
    assert not np.array_equal(np.asarray(other_seed)[:3], np.asarray(batched)[:3])
    with pytest.raises(ValueError, match="2 keys for 4 prompt rows"):
        decoding.generate_fixed(params, tokens, mask, decoding.prompt_keys(7, [[1], [2]], rows=2), model_config=cfg,
                                streams=1, num_tokens=8, config=sampled)


def test_prompt_keys_use_every_bit_of_a_64_bit_seed():
    # jax.random.key keeps a seed's low 32 bits: seeds 2**32 and -1 drew the samples of seeds 0 and 2**32 - 1
    data = lambda seed: np.asarray(jax.random.key_data(decoding.prompt_keys(seed, [[3]], rows=1)))  # noqa: E731
    seeds = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 33, 2 ** 64 - 2, -1, -2 ** 63]
    assert len({data(s).tobytes() for s in seeds}) == len(seeds)
    np.testing.assert_array_equal(data(5), np.asarray(jax.random.key_data(
        jax.random.fold_in(jax.random.key(5), 3)))[None])   # seeds below 2**32 draw as before
    with pytest.raises(ValueError, match="seed=18446744073709551616 must be a 64-bit integer"):
        decoding.prompt_keys(2 ** 64, [[3]], rows=1)
