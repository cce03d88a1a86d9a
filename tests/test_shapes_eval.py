"""Shapes-world evaluation: the attribute classifier and the scores built on it.

The classifier is trained once per module on a reduced budget (TEST_STEPS steps instead of the
default); the thresholds below are what that budget reaches on held-out renders, with margin.
"""
import os
from unittest import mock

import numpy as np
import pytest

from cm3leon_jax import attribute_classifier as ac
from cm3leon_jax import shapes_metrics as sm
from data_pipeline import shapes_world as sw

TEST_STEPS = 400
HELDOUT = 160


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("classifier"))
    params = ac.train_classifier(workdir, steps=TEST_STEPS, batch_size=32, seed=0, eval_images=0)
    return workdir, params


@pytest.fixture(scope="module")
def heldout():
    return ac.heldout_examples(HELDOUT, "test")


def _permutation(n, seed=0):
    """A permutation with no fixed point, so every image is paired with another scene."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.roll(perm, 1)[np.argsort(perm)]


# --------------------------------------------------------------------------- classifier


def test_cached_classifier_is_loaded_not_retrained(trained):
    workdir, params = trained
    assert os.path.exists(os.path.join(workdir, ac.CLASSIFIER_SUBDIR, ac.PARAMS_FILE))
    info = ac.classifier_info(workdir)
    assert info["format"] == ac.FORMAT and info["steps"] == TEST_STEPS
    with mock.patch.object(ac.logging, "warning") as warning:
        loaded = ac.train_classifier(workdir, steps=10**9, batch_size=32)  # would take hours if it trained
    # ... but says that it was trained otherwise than asked, naming the setting
    assert warning.call_count == 1 and f"steps {TEST_STEPS} -> asked {10**9}" in warning.call_args[0][-1]
    assert "batch_size" not in warning.call_args[0][-1]
    flat_a = {k: np.asarray(v) for k, v in ac._flatten(params).items()}
    flat_b = {k: np.asarray(v) for k, v in ac._flatten(loaded).items()}
    assert flat_a.keys() == flat_b.keys()
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    assert ac.load_classifier(os.path.join(workdir, ac.CLASSIFIER_SUBDIR)).keys() == params.keys()


def test_a_one_step_classifier_trains():
    """steps=1 passes the steps >= 1 check; its warmup used to leave optax no decay steps (a ValueError
    from inside optax's schedule)."""
    params = ac.train_classifier(None, steps=1, batch_size=2, eval_images=0)
    assert params.keys() == ac.init_params(0).keys()


def test_training_data_is_deterministic_and_labelled():
    a_images, a_index, a_labels = ac.training_batch(3, 7, 8)
    b_images, b_index, b_labels = ac.training_batch(3, 7, 8)
    assert a_images.tobytes() == b_images.tobytes() and np.array_equal(a_index, b_index)
    assert all(np.array_equal(a_labels[k], b_labels[k]) for k in a_labels)
    assert a_images.shape == (8, 64, 64, 3) and a_images.dtype == np.uint8
    assert a_index.shape == (8 * ac.CROPS_PER_IMAGE,) and len(set(a_index.tolist())) == len(a_index)
    assert (a_labels["shape"] > 0).mean() <= ac.MAX_OCCUPIED_SHARE + 1e-9
    assert ac.training_batch(3, 8, 8)[0].tobytes() != a_images.tobytes()


def test_predict_scenes_matches_shapes_world_structure(trained, heldout):
    _, params = trained
    images, scenes = heldout
    preds = ac.predict_scenes(params, images[:12])
    assert isinstance(preds, list) and len(preds) == 12
    for pred in preds:
        assert set(pred) == {"objects", "background"}
        assert pred["background"] in sw.BACKGROUNDS
        positions = [o["position"] for o in pred["objects"]]
        assert positions == sorted(positions, key=sw.POSITIONS.index) and len(set(positions)) == len(positions)
        for obj in pred["objects"]:
            assert set(obj) == set(sw.ATTRIBUTES)
            assert obj["shape"] in sw.SHAPES and obj["color"] in sw.COLORS and obj["size"] in sw.SIZES
        assert sw.render(pred, 32).shape == (32, 32, 3)  # renderable like any scene
    # one image without a batch axis, and another resolution (resized internally)
    assert ac.predict_scenes(params, images[0]) == preds[:1]
    big = np.repeat(np.repeat(images[:4], 2, axis=1), 2, axis=2)
    assert ac.predict_scenes(params, big) == preds[:4]
    assert ac.predict_scenes(params, images[:0]) == []
    feats = ac.features(params, images[:5])
    assert feats.shape == (5, ac.feature_dim()) and feats.dtype == np.float32


def test_classifier_reads_held_out_renders(trained, heldout):
    _, params = trained
    images, scenes = heldout
    acc = ac.classifier_accuracy(params, images, scenes)
    assert acc["occupancy"] >= 0.995 and acc["background"] >= 0.99, acc
    assert acc["color"] >= 0.98 and acc["size"] >= 0.98 and acc["shape"] >= 0.95, acc


def test_faithfulness_real_images_near_one_noise_and_shuffled_near_chance(trained, heldout):
    _, params = trained
    images, scenes = heldout
    real = sm.text_to_image_faithfulness(scenes, ac.predict_scenes(params, images))
    assert real["num_scenes"] == HELDOUT and real["num_objects"] == sum(len(s["objects"]) for s in scenes)
    assert real["overall"] >= 0.98, real
    for key in ("position", "color", "size", "count", "background"):
        assert real[key] >= 0.97, (key, real)
    assert real["shape"] >= 0.95, real

    # Chance: the score of the true scenes of *other* images (no classifier involved).
    perm = _permutation(HELDOUT)
    chance = sm.text_to_image_faithfulness(scenes, [scenes[i] for i in perm])
    assert chance["overall"] < 0.3, chance
    shuffled = sm.text_to_image_faithfulness(scenes, ac.predict_scenes(params, images[perm]))
    assert abs(shuffled["overall"] - chance["overall"]) < 0.06, (shuffled, chance)
    assert shuffled["shape"] < 0.12 and shuffled["position"] < 0.45, shuffled

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
    noisy = sm.text_to_image_faithfulness(scenes, ac.predict_scenes(params, noise))
    assert noisy["overall"] <= chance["overall"] + 0.05, (noisy, chance)
    assert noisy["shape"] < 0.1 and noisy["color"] < 0.15, noisy


def test_frechet_distance_in_classifier_space(trained, heldout):
    _, params = trained
    images, _ = heldout
    feats = ac.features(params, images)
    half = HELDOUT // 2
    real_vs_real = sm.frechet_distance(feats[:half], feats[half:])
    noise = np.random.default_rng(1).integers(0, 256, images[:half].shape, dtype=np.uint8)
    real_vs_noise = sm.frechet_distance(feats[:half], ac.features(params, noise))
    assert sm.frechet_distance(feats, feats) < 1e-6 * max(1.0, real_vs_real)
    assert real_vs_noise > 3 * real_vs_real > 0, (real_vs_real, real_vs_noise)


# --------------------------------------------------------------------------- pure metrics


def _scene(background, *objects):
    return {"background": background,
            "objects": [dict(zip(sw.ATTRIBUTES, o)) for o in objects]}


def test_faithfulness_counts_each_attribute():
    requested = [_scene("white", ("circle", "red", "small", "top"), ("star", "blue", "large", "center")),
                 _scene("black", ("cross", "green", "large", "left"))]
    predicted = [_scene("white", ("circle", "pink", "small", "top")),          # star missing
                 _scene("dark gray", ("square", "green", "large", "left"), ("star", "red", "small", "right"))]
    got = sm.text_to_image_faithfulness(requested, predicted)
    assert got["position"] == pytest.approx(2 / 3) and got["shape"] == pytest.approx(1 / 3)
    assert got["color"] == pytest.approx(1 / 3) and got["size"] == pytest.approx(2 / 3)
    assert got["count"] == 0.0 and got["background"] == 0.5
    assert got["overall"] == pytest.approx(np.mean([2 / 3, 1 / 3, 1 / 3, 2 / 3, 0.0, 0.5]))
    assert got["all_correct"] == 0.0 and got["num_objects"] == 3 and got["num_scenes"] == 2
    perfect = sm.text_to_image_faithfulness(requested, requested)
    assert all(perfect[k] == 1.0 for k in sm.SCORED_ATTRIBUTES + ("overall", "all_correct"))
    with pytest.raises(ValueError):
        sm.text_to_image_faithfulness(requested, predicted[:1])


def _random_world_scenes(n, seed):
    return [sw.sample_scene(np.random.default_rng([seed, i])) for i in range(n)]


def _corrupt(scene, rng, rate):
    """The scene with each object's colour swapped for another at `rate`: a noisy generator."""
    objects = []
    for obj in scene["objects"]:
        obj = dict(obj)
        if rng.random() < rate:
            obj["color"] = next(c for c in sw.COLORS if c != obj["color"])
        objects.append(obj)
    return {"objects": objects, "background": scene["background"]}


def test_hit_totals_reproduce_the_faithfulness_shares():
    requested = _random_world_scenes(12, seed=1)
    rng = np.random.default_rng(0)
    images = [(p, _corrupt(requested[p], rng, 0.5)) for p in range(12) for _ in range(3)]  # 3 samples a prompt
    req, pred = [requested[p] for p, _ in images], [s for _, s in images]
    attributes = ("shape", "color", "position", "count")
    totals = sm.hit_totals(sm.image_hits(req, pred), [p for p, _ in images], 12, attributes)
    assert totals.shape == (12, 4, 2)
    scores = sm.text_to_image_faithfulness(req, pred)
    assert sm.share_of_totals(totals) == pytest.approx(np.mean([scores[a] for a in attributes]))
    # weights count how often each prompt is drawn: all ones is the point estimate again
    assert sm.share_of_totals(totals, np.ones((2, 12))) == pytest.approx([sm.share_of_totals(totals)] * 2)
    with pytest.raises(ValueError):
        sm.hit_totals(sm.image_hits(req, pred), [0] * 5, 12)
    # captions: the per-caption totals give caption_accuracy's overall share (all six attributes)
    pairs = [sw.scene_and_caption("validation", i) for i in range(10)]
    scenes, captions = [p[0] for p in pairs], [p[1] for p in pairs[1:]] + ["not a caption"]
    caption_totals = sm.hit_totals(sm.caption_hits(scenes, captions), range(10), 10)
    assert sm.share_of_totals(caption_totals) == pytest.approx(sm.caption_accuracy(scenes, captions)["overall"])


def test_bootstrap_separates_a_better_strategy_and_not_an_equal_one():
    requested = _random_world_scenes(64, seed=2)
    prompts = np.repeat(np.arange(64), 4)
    req = [requested[p] for p in prompts]

    def strategy(rate, seed):
        rng = np.random.default_rng(seed)
        return sm.hit_totals(sm.image_hits(req, [_corrupt(requested[p], rng, rate) for p in prompts]), prompts, 64)

    totals = {"base": strategy(0.6, 0), "better": strategy(0.1, 1), "same_rate": strategy(0.6, 2),
              "base_again": strategy(0.6, 0)}
    got = sm.bootstrap_comparison(totals, "base", num_resamples=500, seed=0)
    assert got["num_items"] == 64 and got["baseline"] == "base" and "base" not in got["differences"]
    for name, s in got["shares"].items():
        assert s["interval"][0] <= s["share"] <= s["interval"][1], name
    better = got["differences"]["better"]
    assert better["interval"][0] > 0 and better["above_baseline"] == 1.0
    assert better["difference"] == pytest.approx(got["shares"]["better"]["share"]
                                                 - got["shares"]["base"]["share"])
    same = got["differences"]["same_rate"]  # the same generator with other random draws: noise
    assert same["interval"][0] < 0 < same["interval"][1]
    assert got["differences"]["base_again"]["interval"] == [0.0, 0.0]  # paired: identical hits, no spread
    assert got["differences"]["base_again"]["above_baseline"] == 0.5  # ties: no evidence either way (was 0.0)
    assert 0.0 < got["differences"]["same_rate"]["above_baseline"] < 1.0
    assert sm.above_share(np.array([1.0, -1.0, 0.0, 1e-15])) == pytest.approx(0.5)
    assert sm.bootstrap_comparison(totals, "base", num_resamples=500, seed=0) == got  # seeded
    with pytest.raises(ValueError, match="baseline"):
        sm.bootstrap_comparison(totals, "topp")
    with pytest.raises(ValueError, match="same prompts"):
        sm.bootstrap_comparison({"a": totals["base"], "b": totals["base"][:10]}, "a")
    with pytest.raises(ValueError, match="level"):
        sm.bootstrap_comparison(totals, "base", level=1.0)
    with pytest.raises(ValueError, match="at least one prompt"):   # was a ZeroDivisionError
        sm.bootstrap_comparison({"a": totals["base"][:0], "b": totals["base"][:0]}, "a")


def test_caption_accuracy_true_other_and_unparseable():
    pairs = [sw.scene_and_caption("validation", i) for i in range(120)]
    scenes, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    true = sm.caption_accuracy(scenes, captions)
    assert all(true[k] == 1.0 for k in sm.SCORED_ATTRIBUTES + ("overall", "all_correct"))
    assert true["unparseable"] == 0.0

    other = sm.caption_accuracy(scenes, [captions[i] for i in _permutation(len(captions))])
    assert other["overall"] < 0.35 and other["shape"] < 0.12 and other["all_correct"] < 0.05, other

    broken = list(captions)
    broken[0] = "a red circle on a black background"      # no size or position: does not parse
    broken[1] = "the model wrote nothing useful"
    got = sm.caption_accuracy(scenes[:4], broken[:4])
    assert got["unparseable"] == 0.5
    n0, n1 = len(scenes[0]["objects"]), len(scenes[1]["objects"])
    n = sum(len(s["objects"]) for s in scenes[:4])
    assert got["shape"] == pytest.approx((n - n0 - n1) / n)
    assert got["background"] == 0.5 and got["count"] == 0.5


def test_caption_count_follows_the_number_the_caption_states():
    """A caption stating "three shapes" but listing the two true objects used to score its count right."""
    scene = {"objects": [{"shape": "circle", "color": "red", "size": "small", "position": "top"},
                         {"shape": "square", "color": "blue", "size": "large", "position": "bottom left"}],
             "background": "black"}
    listed = "; ".join(f"a {o['size']} {o['color']} {o['shape']} at the {o['position']}" for o in scene["objects"])
    for stated, count in (("three shapes", 0.0), ("two shapes", 1.0), ("There are three objects.", 0.0), ("", 1.0)):
        got = sm.caption_accuracy([scene], [f"{stated} on {scene['background']}: {listed}"])
        assert got["count"] == count and got["shape"] == 1.0 and got["all_correct"] == count, (stated, got)


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) * 2.0 + 0.5
    assert sm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
    assert sm.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    d_ab, d_ba = sm.frechet_distance(a, b), sm.frechet_distance(b, a)
    assert d_ab == pytest.approx(d_ba, rel=1e-6) and d_ab > sm.frechet_distance(a, a + 0.1)
    # closed form for diagonal Gaussians: sum (s_a - s_b)^2 over dimensions
    d = sm.frechet_distance_from_stats(np.zeros(3), np.diag([1.0, 4.0, 9.0]), np.zeros(3), np.diag([4.0, 4.0, 1.0]))
    assert d == pytest.approx(1.0 + 0.0 + 4.0)
    # fewer samples than dimensions (singular covariances) stays finite and non-negative
    few = sm.frechet_distance(rng.normal(size=(5, 40)), rng.normal(size=(7, 40)))
    assert np.isfinite(few) and few >= 0
    with pytest.raises(ValueError):
        sm.frechet_distance(a[:1], b)
    with pytest.raises(ValueError):
        sm.frechet_distance(a, b[:, :5])


def test_user_supplied_feature_network_npz_and_safetensors(tmp_path):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 12)]
    kernels = [rng.normal(scale=0.3, size=s).astype(np.float32) for s in shapes]
    biases = [rng.normal(scale=0.1, size=s[-1]).astype(np.float32) for s in shapes]
    npz = str(tmp_path / "net.npz")
    np.savez(npz, **{f"conv{i}/kernel": k for i, k in enumerate(kernels)},
             **{f"conv{i}/bias": b for i, b in enumerate(biases)},
             input_mean=np.full(3, 0.5, np.float32), input_std=np.full(3, 0.25, np.float32),
             input_size=np.array(32))
    st = str(tmp_path / "net.safetensors")   # the same network in PyTorch's OIHW layout
    save_file({**{f"conv{i}.weight": np.ascontiguousarray(k.transpose(3, 2, 0, 1)) for i, k in enumerate(kernels)},
               **{f"conv{i}.bias": b for i, b in enumerate(biases)},
               "input_mean": np.full(3, 0.5, np.float32), "input_std": np.full(3, 0.25, np.float32),
               "input_size": np.array(32, np.int64)}, st)
    net_a, net_b = sm.load_feature_network(npz), sm.load_feature_network(st)
    images = np.stack([sw.example("validation", i)["image"] for i in range(24)])
    fa, fb = sm.features_from_network(net_a, images), sm.features_from_network(net_b, images)
    assert fa.shape == (24, 12) and fa.dtype == np.float32 and np.isfinite(fa).all()
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)
    assert sm.frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)
    noise = np.random.default_rng(1).integers(0, 256, images.shape, dtype=np.uint8)
    assert sm.frechet_distance(fa, sm.features_from_network(net_a, noise)) > 0
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **{"conv0/kernel": kernels[0], "conv2/kernel": kernels[2]})
    with pytest.raises(ValueError):
        sm.load_feature_network(bad)
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(b"not loaded")
    with pytest.raises(ValueError):
        sm.load_feature_network(str(pkl))


def test_tuned_sampling_settings_replace_only_the_knobs_a_strategy_uses():
    from cm3leon_jax import evaluate, sampling
    tuned = dict(cfg_scale=2.0, top_p=0.7, top_k=16, temperature=0.8)
    full = evaluate.strategy_sampling("topp_topk_cfg", **tuned)
    assert (full.cfg_scale, full.top_p, full.top_k, full.temperature) == (2.0, 0.7, 16, 0.8)
    topp = evaluate.strategy_sampling("topp", **tuned)  # no guidance, no TopK: those stay off
    assert (topp.cfg_scale, topp.top_p, topp.top_k, topp.temperature) == (1.0, 0.7, 0, 0.8)
    assert evaluate.strategy_sampling("greedy", **tuned).temperature == 0.0  # greedy stays greedy
    cdk = evaluate.strategy_sampling("cdk", **tuned)
    assert (cdk.cd_k, cdk.temperature, cdk.top_p) == (sampling.DEFAULT_CD_K, 1.0, 1.0)
    cdk = evaluate.strategy_sampling("cdk", cd_k=4, cd_alpha=0.3, **tuned)  # CD-K's own knobs
    assert (cdk.cd_k, cdk.cd_alpha, cdk.cfg_scale, cdk.top_k) == (4, 0.3, 1.0, 0)
    topp = evaluate.strategy_sampling("topp_topk_cfg", cd_k=4, cd_alpha=0.3)  # no contrast: untouched
    assert (topp.cd_k, topp.cd_alpha) == (0, sampling.SamplingConfig().cd_alpha)
    assert evaluate.strategy_sampling("topp", top_p=None) == evaluate.STRATEGIES["topp"].config
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(top_k=2.5), dict(temperature=0.0),
                dict(cfg_scale=-1.0), dict(cd_k=0), dict(cd_k=1.5), dict(cd_alpha=0.0), dict(cd_alpha=1.5)):
        with pytest.raises(ValueError, match="out of range"):
            evaluate.strategy_sampling("topp_topk_cfg", **bad)
    with pytest.raises(ValueError, match="unknown sampling settings"):
        evaluate.strategy_sampling("topp", top_a=0.1)


def test_sample_diversity_is_zero_for_identical_samples_and_grows_with_difference():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert sm.sample_diversity([np.stack([image] * 4), np.stack([image] * 3)]) == 0.0  # greedy-like: no diversity
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    assert sm.sample_diversity([np.stack([black, white])]) == pytest.approx(1.0)
    # three samples, two identical: pairs differ by 0, 1, 1 -> 2/3; a lone sample is left out of the mean
    assert sm.sample_diversity([np.stack([black, black, white]), black[None]]) == pytest.approx(2 / 3)
    noisy = np.clip(image[None].astype(int) + rng.integers(-20, 21, (4, 8, 8, 3)), 0, 255).astype(np.uint8)
    assert 0 < sm.sample_diversity([noisy]) < sm.sample_diversity([rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)])


class _IdentityVQ:
    image_size = 64

    def encode(self, images):
        return np.asarray(images)

    def decode(self, codes):
        return np.asarray(codes)


class _PerfectGenerator:
    """Stands in for generate.Generator: draws each held-out caption's own render (a perfect
    text -> image model) and writes a fixed caption; no retriever, no data dir."""

    def __init__(self, workdir, **_):
        import types
        from cm3leon_jax import evaluate
        self.vq, self.step, self.data_dir, self.clip_scorer = _IdentityVQ(), 0, None, None
        self.model_config = types.SimpleNamespace(dtype="float32")
        self.can_retrieve = self.can_rerank = False
        held = evaluate.heldout_prompts(16, self.vq.image_size)
        self._image_of = dict(zip(held["captions"], held["images"]))

    def text_to_image(self, captions, num_samples, **_):
        import types
        return [types.SimpleNamespace(images=np.stack([self._image_of[c]] * num_samples)) for c in captions]

    def retrieve_for_image(self, codes, k):
        return []

    def caption_codes(self, codes, retrieved, seed=0):
        return ["a red star"] * len(codes)


def test_frechet_distance_compares_with_the_prompts_own_images_whatever_num_captions(tmp_path, monkeypatch):
    """A perfect generator is at distance 0 from the real images of its prompts; the real side
    used to be all max(num_prompts, num_captions) held-out images, so the text -> image figure
    moved with the unrelated number of image -> text captions."""
    from cm3leon_jax import evaluate, generate
    monkeypatch.setattr(generate, "Generator", _PerfectGenerator)
    ac.save_classifier(str(tmp_path), ac.init_params(0), {"format": ac.FORMAT})  # untrained: features suffice
    for num_captions in (0, 8):
        report = evaluate.evaluate(str(tmp_path), out_dir=str(tmp_path / f"out{num_captions}"), strategies=["topp"],
                                   num_prompts=4, num_samples=1, num_captions=num_captions, num_val_documents=0,
                                   num_vq_images=0, classifier_dir=str(tmp_path))
        assert report["text_to_image"]["topp"]["frechet_distance_classifier_features"] == pytest.approx(0.0, abs=1e-6)


def test_classifier_dir_may_name_the_classifier_folder_itself(tmp_path, monkeypatch):
    """`--classifier_dir W/attribute_classifier` (the folder load_classifier also takes) used to train a
    new classifier into W/attribute_classifier/attribute_classifier and score with that one."""
    from cm3leon_jax import evaluate, generate
    monkeypatch.setattr(generate, "Generator", _PerfectGenerator)
    ac.save_classifier(str(tmp_path), ac.init_params(0), {"format": ac.FORMAT, "note": "cached"})
    folder = str(tmp_path / ac.CLASSIFIER_SUBDIR)
    report = evaluate.evaluate(str(tmp_path), out_dir=str(tmp_path / "out"), strategies=["topp"], num_prompts=2,
                               num_samples=1, num_captions=0, num_val_documents=0, num_vq_images=0,
                               classifier_dir=folder, classifier_steps=1)
    assert report["classifier"].get("note") == "cached"
    assert not os.path.exists(os.path.join(folder, ac.CLASSIFIER_SUBDIR))


def test_the_sampling_seed_does_not_change_the_classifier(tmp_path, monkeypatch):
    """`--seed` used to train the judge too: each sampling seed got another classifier (or a cached one
    with a warning that its seed differed). It has its own `classifier_seed` (default 0)."""
    from cm3leon_jax import evaluate, generate
    monkeypatch.setattr(generate, "Generator", _PerfectGenerator)
    kwargs = dict(strategies=["topp"], num_prompts=2, num_samples=1, num_captions=0, num_val_documents=0,
                  num_vq_images=0, classifier_steps=1)
    for seed, classifier_seed, where in ((3, 0, "a"), (0, 5, "b")):
        report = evaluate.evaluate(str(tmp_path), out_dir=str(tmp_path / where), classifier_dir=str(tmp_path / where),
                                   seed=seed, classifier_seed=classifier_seed, **kwargs)
        assert report["classifier"]["seed"] == classifier_seed


class _RerankingGenerator(_PerfectGenerator):
    """Reranks: each prompt's first (best) sample is its own render, the others noise."""

    def __init__(self, workdir, **kwargs):
        super().__init__(workdir, **kwargs)
        self.can_rerank = True

    def text_to_image(self, captions, num_samples, **_):
        import types
        noise = np.random.default_rng(0).integers(0, 256, (num_samples - 1, 64, 64, 3), dtype=np.uint8)
        return [types.SimpleNamespace(images=np.concatenate([self._image_of[c][None], noise])) for c in captions]


def test_a_reranked_strategy_is_at_frechet_distance_of_its_best_samples(tmp_path, monkeypatch):
    """Reranked strategies score each prompt's best sample only; the Frechet distance used to take
    every sample (the discarded ones too), unlike the scores and the user network's distance."""
    from cm3leon_jax import evaluate, generate
    monkeypatch.setattr(generate, "Generator", _RerankingGenerator)
    ac.save_classifier(str(tmp_path), ac.init_params(0), {"format": ac.FORMAT})
    report = evaluate.evaluate(str(tmp_path), out_dir=str(tmp_path / "out"), strategies=["topp_cdk_rerank"],
                               num_prompts=4, num_samples=3, num_captions=0, num_val_documents=0, num_vq_images=0,
                               classifier_dir=str(tmp_path))
    row = report["text_to_image"]["topp_cdk_rerank"]
    assert row["reranked"] and row["scored_images"] == 4
    assert row["frechet_distance_classifier_features"] == pytest.approx(0.0, abs=1e-6)
    assert row["sample_diversity"] > 0   # diversity still compares every sample of a prompt


def test_the_user_network_frechet_distance_is_in_the_markdown_report():
    from cm3leon_jax import evaluate
    row = {c: 0.5 for c in ("requested", "shape", "color", "position", "count", "size", "background", "all_correct")}
    row.update(frechet_distance_classifier_features=1.0, sample_diversity=0.01, neighbours=0)
    report = {"workdir": "w", "step": 1, "text_to_image": {"topp": dict(row, frechet_distance_user_network=12.345),
                                                           "greedy": row}}
    markdown = evaluate._markdown(report)   # computed with --feature_network, it used to reach report.json only
    assert "| topp | 12.345 |" in markdown and "| greedy | 12" not in markdown
    assert "user network" not in evaluate._markdown({**report, "text_to_image": {"greedy": row}})
    # validation loss at one k (no retriever to compare with): the heading read "minus k=None"
    one_k = {"workdir": "w", "step": 1, "validation_loss": {"0": {"loss": 0.65, "query_tokens": 100}},
             "validation_loss_bootstrap": None}
    assert "k=None" not in evaluate._markdown(one_k) and "| 0 | 0.6500 |  |" in evaluate._markdown(one_k)
