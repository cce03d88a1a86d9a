import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax import sampling

LOGITS = jnp.log(jnp.array([0.05, 0.4, 0.1, 0.25, 0.2]))


def _kept(x):
    return set(np.flatnonzero(np.isfinite(np.asarray(x))).tolist())


def test_top_k_and_top_p_keep_exactly_the_right_sets():
    assert _kept(sampling.top_k_filter(LOGITS, 2)) == {1, 3}
    assert _kept(sampling.top_k_filter(LOGITS, 0)) == {0, 1, 2, 3, 4}
    assert _kept(sampling.top_p_filter(LOGITS, 0.35)) == {1}         # the top token alone reaches 0.35
    assert _kept(sampling.top_p_filter(LOGITS, 0.6)) == {1, 3}       # 0.4 + 0.25 >= 0.6
    assert _kept(sampling.top_p_filter(LOGITS, 0.8)) == {1, 3, 4}    # + 0.2
    assert _kept(sampling.top_p_filter(LOGITS, 0.9)) == {1, 2, 3, 4}


def test_filters_on_random_logits_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 50)).astype(np.float32)
    for k in (1, 5, 17):
        kept = np.isfinite(np.asarray(sampling.top_k_filter(jnp.asarray(logits), k)))
        np.testing.assert_array_equal(kept, logits >= np.sort(logits, axis=1)[:, -k][:, None])
    for p in (0.1, 0.5, 0.9):
        kept = np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(logits), p)))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        for row in range(16):
            order = np.argsort(-probs[row])
            before = np.cumsum(probs[row][order]) - probs[row][order]
            np.testing.assert_array_equal(np.sort(order[before < p]), np.flatnonzero(kept[row]))


def test_contrastive_topk_plausibility_set_and_scores():
    expert = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    amateur = jnp.log(jnp.array([0.7, 0.1, 0.1, 0.1]))
    scores = sampling.contrastive_topk_scores(expert, amateur, k=2, alpha=0.5)  # threshold 0.5 * 0.3
    assert _kept(scores) == {0, 1, 2}
    np.testing.assert_allclose(np.asarray(scores)[[0, 1, 2]], np.log([0.5 / 0.7, 0.3 / 0.1, 0.15 / 0.1]), rtol=1e-5)
    # the expert-preferred-but-generic token 0 loses to token 1, which the condition made likely
    assert int(jnp.argmax(scores)) == 1


def test_cd_k_plausible_set_is_taken_among_the_allowed_ids():
    # the expert prefers a text token (id 0) so strongly that no image code (ids 2-4) reaches
    # alpha * its probability: over the whole vocabulary nothing drawable would be plausible
    expert = jnp.log(jnp.array([[0.97, 0.0, 0.02, 0.006, 0.004]]) + 1e-9)
    amateur = jnp.log(jnp.array([[0.5, 0.0, 0.1, 0.3, 0.1]]) + 1e-9)
    stacked = jnp.stack([expert, amateur])
    config = sampling.SamplingConfig(cd_k=1, cd_alpha=0.25)
    unrestricted = sampling.restrict_to_ranges(sampling.guided_logits(stacked, config), ((2, 5),))
    assert _kept(unrestricted) == set()  # the failure: a row of -inf
    logits = sampling.next_token_logits(stacked, config, ((2, 5),))
    # among ids 2-4 the expert's probabilities are 2/3, 1/5, 2/15 and the amateur's 1/5, 3/5, 1/5:
    # 0.25 * 2/3 keeps ids 2 and 3
    assert _kept(logits) == {2, 3}
    np.testing.assert_allclose(np.asarray(logits)[0, [2, 3]], np.log([(2 / 3) / (1 / 5), (1 / 5) / (3 / 5)]),
                               rtol=1e-4)
    draws = jax.vmap(lambda k: sampling.draw(k, logits, 1.0))(jax.random.split(jax.random.key(0), 64))
    assert set(np.asarray(draws).ravel().tolist()) <= {2, 3}
    # CFG is unchanged by the restriction order: guidance first, then the allowed ids
    cfg = sampling.SamplingConfig(cfg_scale=2.0)
    np.testing.assert_allclose(sampling.next_token_logits(stacked, cfg, ((2, 5),))[0, 2:],
                               sampling.classifier_free_guidance(expert, amateur, 2.0)[0, 2:], rtol=1e-6)


def test_guidance_formulas():
    cond, uncond, img = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]), jnp.array([1.5, 0.5])
    np.testing.assert_allclose(sampling.classifier_free_guidance(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(sampling.classifier_free_guidance(cond, uncond, 3.0), [4.0, -2.0])
    np.testing.assert_allclose(sampling.three_stream_guidance(cond, img, uncond, 1.5, 7.5),
                               uncond + 1.5 * (img - uncond) + 7.5 * (cond - img))
    stacked = jnp.stack([cond, uncond])
    np.testing.assert_allclose(sampling.guided_logits(stacked, sampling.SamplingConfig(cfg_scale=1.0)), cond)
    restricted = sampling.restrict_to_ranges(jnp.zeros(8), ((2, 4), (6, 7)))
    assert _kept(restricted) == {2, 3, 6}


def test_greedy_and_seeded_draws():
    assert int(sampling.draw(jax.random.key(0), LOGITS, 0.0)) == 1
    draws = jax.vmap(lambda k: sampling.draw(k, LOGITS, 1.0))(jax.random.split(jax.random.key(0), 4000))
    freq = np.bincount(np.asarray(draws), minlength=5) / 4000
    np.testing.assert_allclose(freq, [0.05, 0.4, 0.1, 0.25, 0.2], atol=0.03)


def test_top_p_keeps_the_top_token_at_any_p_and_bad_settings_are_refused():
    # p = 0 (or a p below the top token's own mass before it, 0) used to keep nothing: a row of -inf
    # draws id 0 (<pad>), outside any allowed range
    for p in (0.0, 1e-9):
        assert _kept(sampling.top_p_filter(LOGITS, p)) == {1}
    logits = sampling.next_token_logits(jnp.stack([LOGITS[None]]), sampling.SamplingConfig(top_p=0.0), ((2, 5),))
    assert _kept(logits) == {3}
    assert int(sampling.draw(jax.random.key(0), logits[0], 1.0)) == 3
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=-0.1), dict(top_p=1.5), dict(cd_k=-2),
                dict(cd_alpha=0.0), dict(cd_alpha=1.5)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            sampling.SamplingConfig(**bad)


def test_non_finite_temperature_or_guidance_scale_is_refused():
    # every logit turned NaN and the draw was id 0, outside the allowed range
    for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(cfg_scale=float("nan")),
                dict(cfg_scale=float("inf")), dict(image_cfg_scale=float("-inf"))):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            sampling.SamplingConfig(**bad)
    sampling.SamplingConfig(temperature=0.0, cfg_scale=-2.0, image_cfg_scale=0.0)
