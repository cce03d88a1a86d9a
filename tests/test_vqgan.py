"""Tests for the VQ-GAN tokenizer (cm3leon_jax.vqgan) and its losses (cm3leon_jax.vq_losses).

Kept tiny (8-channel models, 16x16 images) because XLA compile time on the shared 2-core CPU
dominates: the 16x-downsampling config is checked with ``jax.eval_shape`` (no compile), and the
8x config's params are shared through a module-scoped fixture.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cm3leon_jax import vq_losses, vqgan

TINY = dict(
    image_size=16,
    channels=8,
    channel_multipliers=(1, 2, 2, 4),  # 8x down: 16x16 -> 2x2 codes
    num_res_blocks=1,
    attention_at_lowest=True,
    codebook_size=32,
    code_dim=4,
    embed_dim=8,
    num_groups=4,
)


def _toy_images(n=4, size=16, seed=0):
    """Flat-colour rectangles on a flat background, uint8 [n,size,size,3]."""
    rs = np.random.RandomState(seed)
    imgs = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        imgs[i] = rs.randint(0, 256, 3)
        y0, x0 = rs.randint(0, size // 2, 2)
        h, w = rs.randint(size // 4, size // 2, 2)
        imgs[i, y0:y0 + h, x0:x0 + w] = rs.randint(0, 256, 3)
    return imgs


@pytest.fixture(scope="module")
def tiny():
    cfg = vqgan.VQGANConfig(**TINY)
    return cfg, vqgan.init_params(jax.random.PRNGKey(0), cfg)


# ------------------------------------------------------------------------------ quantizer


def test_quantize_values_and_straight_through():
    z = np.array([[0.9, 0.1], [0.2, 0.8], [-0.6, -0.5]], np.float32)
    codebook = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], np.float32)
    beta = 0.25
    res = jax.jit(vqgan.quantize, static_argnums=2)(z, codebook, beta)

    d = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
    codes = d.argmin(-1)
    zq = codebook[codes]
    np.testing.assert_array_equal(np.asarray(res.codes), codes)
    assert res.codes.dtype == jnp.int32
    np.testing.assert_allclose(res.quantized, zq, atol=1e-6)  # forward value = the code
    np.testing.assert_allclose(res.codebook_loss, ((zq - z) ** 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(res.commitment_loss, beta * ((zq - z) ** 2).mean(), rtol=1e-6)

    # Straight-through: d quantized / d z is the identity.
    jac = jax.jacfwd(lambda v: vqgan.quantize(v.reshape(3, 2), codebook, beta).quantized.reshape(-1))(
        jnp.asarray(z).reshape(-1))
    np.testing.assert_allclose(jac, np.eye(6), atol=1e-6)

    # Codebook loss moves only the codebook (and only used codes); commitment only the encoder.
    g_cb_z, g_cb_e = jax.grad(lambda a, b: vqgan.quantize(a, b, beta).codebook_loss, (0, 1))(z, codebook)
    g_cm_z, g_cm_e = jax.grad(lambda a, b: vqgan.quantize(a, b, beta).commitment_loss, (0, 1))(z, codebook)
    np.testing.assert_allclose(g_cb_z, 0.0)
    np.testing.assert_allclose(g_cm_e, 0.0)
    np.testing.assert_allclose(g_cm_z, 2 * beta * (z - zq) / z.size, rtol=1e-5, atol=1e-7)
    unused = sorted(set(range(4)) - set(codes.tolist()))
    np.testing.assert_allclose(np.asarray(g_cb_e)[unused], 0.0)


def test_usage_and_perplexity():
    counts = jnp.array([4.0, 4.0, 0.0, 0.0])
    assert float(vq_losses.codebook_usage(counts)) == pytest.approx(0.5)
    assert float(vq_losses.code_perplexity(counts)) == pytest.approx(2.0, rel=1e-5)
    assert float(vq_losses.code_perplexity(jnp.ones(8))) == pytest.approx(8.0, rel=1e-5)
    c = vqgan.code_counts(jnp.array([[0, 1], [1, 3]]), 5)
    np.testing.assert_array_equal(c, [1, 2, 0, 1, 0])


def test_reseed_dead_codes_raises_usage():
    k, d = 16, 4
    rng = np.random.RandomState(0)
    # Encoder outputs spread over one hemisphere; all codes but #0 sit at the opposite pole,
    # so code 0 wins every lookup: 15 of 16 codes are dead.
    enc = vqgan.l2_normalize(jnp.asarray(rng.randn(64, d) * 0.5 + np.array([3.0, 0, 0, 0]), jnp.float32))
    codebook = np.tile(np.array([[-1.0, 0, 0, 0]], np.float32), (k, 1))
    codebook[0] = [1.0, 0, 0, 0]
    before = vqgan.quantize(enc, vqgan.l2_normalize(codebook)).codes
    usage = vqgan.code_counts(before, k)
    assert float(vq_losses.codebook_usage(usage)) == pytest.approx(1 / k)

    reseed = jax.jit(functools.partial(vqgan.reseed_dead_codes, threshold=0.5, noise_std=1e-3))
    new_cb, dead = reseed(jnp.asarray(codebook), usage, enc.reshape(8, 8, d), jax.random.PRNGKey(1))
    new_cb2, _ = reseed(jnp.asarray(codebook), usage, enc.reshape(8, 8, d), jax.random.PRNGKey(1))
    np.testing.assert_array_equal(new_cb, new_cb2)  # deterministic given the key
    np.testing.assert_array_equal(dead, np.arange(k) > 0)
    np.testing.assert_array_equal(new_cb[0], codebook[0])  # live codes untouched
    after = vqgan.quantize(enc, vqgan.l2_normalize(new_cb)).codes
    usage_after = float(vq_losses.codebook_usage(vqgan.code_counts(after, k)))
    assert usage_after >= 0.75, usage_after

    # Same thing through a params tree, with EMA usage.
    params = {"quantizer": {"codebook": jnp.asarray(codebook)}, "encoder": {}}
    ema = vqgan.update_usage(jnp.zeros(k), usage, decay=0.9)
    new_params, dead2 = jax.jit(vqgan.reseed_params)(params, ema, enc, jax.random.PRNGKey(2))
    assert int(dead2.sum()) == k - 1
    assert not np.allclose(new_params["quantizer"]["codebook"][1:], codebook[1:])


# ------------------------------------------------------------------------------ model / API


def test_encode_decode_8x(tiny):
    cfg, params = tiny
    assert cfg.downsample_factor == 8 and cfg.latent_size == 2
    imgs = _toy_images(3)
    codes = vqgan.encode(params, imgs, cfg)
    assert codes.shape == (3, 2, 2) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
    # A ConfigDict config and a {'params': ...} wrapper hit the same compiled program.
    cd = ml_collections.ConfigDict(dict(TINY, channel_multipliers=list(TINY["channel_multipliers"])))
    np.testing.assert_array_equal(vqgan.encode({"params": params}, imgs, cd), codes)

    out = vqgan.decode(params, codes, cfg)
    assert out.shape == (3, 16, 16, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    u8 = vqgan.decode_to_uint8(params, codes, cfg)
    assert u8.dtype == np.uint8 and u8.shape == (3, 16, 16, 3)

    # Training forward via model.apply on the equivalent float [-1,1] input: same codes.
    model = vqgan.VQGAN(cfg)
    as_float = imgs.astype(np.float32) / 127.5 - 1.0
    recon, q = jax.jit(model.apply)({"params": params}, as_float)
    np.testing.assert_array_equal(q.codes, codes)
    assert recon.shape == (3, 16, 16, 3) and recon.dtype == jnp.float32
    assert q.encodings.shape == (3, 2, 2, cfg.code_dim)
    np.testing.assert_allclose(jnp.linalg.norm(q.encodings, axis=-1), 1.0, rtol=1e-5)
    assert float(q.counts.sum()) == 12 and 1.0 <= float(q.perplexity) <= cfg.codebook_size
    # All params float32 whatever the compute dtype.
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    # Fast init: Flax's param tree, lecun-normal kernels, unit-norm codebook.
    ref = jax.eval_shape(model.init, jax.random.PRNGKey(0), as_float)["params"]
    assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(params)
    k = params["decoder"]["up0_res0"]["conv1"]["kernel"]  # fan_in 3*3*32
    assert float(jnp.std(k)) == pytest.approx(1 / np.sqrt(k.shape[0] * k.shape[1] * k.shape[2]), rel=0.1)
    np.testing.assert_allclose(jnp.linalg.norm(params["quantizer"]["codebook"], axis=-1), 1.0, rtol=1e-5)

    with pytest.raises(ValueError):
        vqgan.encode(params, imgs[:, :12, :12], cfg)
    for bad in (-1, cfg.codebook_size):  # would wrap round / decode to NaN (black) silently
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
            vqgan.decode(params, np.full((1, 2, 2), bad), cfg)
    with pytest.raises(ValueError):
        vqgan.VQGANConfig.from_config(dict(TINY, not_a_field=1))


def test_shapes_16x_and_bf16():
    """16x config (5 levels): 32x32 -> 2x2.  eval_shape traces everything without compiling."""
    cfg = vqgan.VQGANConfig(**dict(TINY, image_size=32, channel_multipliers=(1, 1, 2, 2, 4),
                                   dtype="bfloat16"))
    assert cfg.downsample_factor == 16 and cfg.tokens_per_image == 4
    p = jax.eval_shape(functools.partial(vqgan.init_params, config=cfg), jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))
    imgs = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8)
    codes = jax.eval_shape(functools.partial(vqgan.encode, config=cfg), p, imgs)
    assert codes.shape == (2, 2, 2) and codes.dtype == jnp.int32
    out = jax.eval_shape(functools.partial(vqgan.decode, config=cfg), p, codes)
    assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32


def test_patch_stem_is_exact_space_to_depth_and_norm_options():
    """patch_size folds p x p pixel patches into channels (and the head unfolds them): 8x down
    from a 4x stem plus one stride-2 level; every norm option keeps shapes, the gradient path
    of the pixel-shuffle head (adaptive GAN weight) and a clear error on a typo."""
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    folded = vqgan.space_to_depth(x, 4)
    assert folded.shape == (2, 2, 2, 48)
    np.testing.assert_array_equal(folded[1, 1, 0].reshape(4, 4, 3), x[1, 4:8, 0:4])
    cfg = vqgan.VQGANConfig(**dict(TINY, patch_size=4, channel_multipliers=(1, 2)))
    np.testing.assert_array_equal(vqgan.pixels_from_head(cfg, folded), x)
    assert cfg.downsample_factor == 8 and cfg.latent_size == 2
    imgs = _toy_images(2)
    for norm in ("group", "layer", "none"):
        c = vqgan.VQGANConfig(**dict(TINY, patch_size=4, channel_multipliers=(1, 2), norm=norm))
        params = vqgan.init_params(jax.random.PRNGKey(0), c)
        assert params["encoder"]["conv_in"]["kernel"].shape == (3, 3, 48, 8)
        assert params["decoder"]["conv_out"]["kernel"].shape == (3, 3, 8, 48)
        assert ("norm1" in params["encoder"]["down0_res0"]) == (norm != "none")
        codes = vqgan.encode(params, imgs, c)
        assert codes.shape == (2, 2, 2)
        assert vqgan.decode(params, codes, c).shape == (2, 16, 16, 3)
    lcfg = vq_losses.VQLossConfig(disc_start=0, disc_weight=0.1, disc_channels=8, disc_layers=2,
                                  perceptual_weight=0.0)
    disc = vq_losses.init_discriminator(jax.random.PRNGKey(1), lcfg, (16, 16, 3))
    loss, aux = vq_losses.vq_loss_fn(params, disc, {"image": imgs}, None, 1, c, lcfg)
    assert np.isfinite(float(loss)) and float(aux["metrics"]["adaptive_weight"]) > 0
    with pytest.raises(ValueError, match="norm"):
        vqgan.VQGANConfig(norm="batch")
    with pytest.raises(ValueError, match="patch_size"):
        vqgan.VQGANConfig(patch_size=0)


def test_local_encoder_codes_each_patch_from_its_own_pixels():
    """local_encoder: a token's code depends on its own 8x8 patch only, so the same patch gets the
    same code wherever it is and whatever surrounds it; the global encoder mixes neighbours in."""
    imgs = _toy_images(2)
    imgs[1] = imgs[0]
    imgs[1, 8:, 8:] = 255 - imgs[1, 8:, 8:]  # a different bottom-right patch only
    base = dict(TINY, patch_size=4, channel_multipliers=(1, 2), norm="none")
    latents = {}
    for local in (True, False):
        c = vqgan.VQGANConfig(**base, local_encoder=local)
        params = vqgan.init_params(jax.random.PRNGKey(0), c)
        z = vqgan.Encoder(c).apply({"params": params["encoder"]}, vqgan.normalize_images(jnp.asarray(imgs)))
        assert z.shape == (2, 2, 2, 8)
        latents[local] = np.abs(np.asarray(z[0] - z[1])).max(-1)
        assert vqgan.decode(params, vqgan.encode(params, imgs, c), c).shape == imgs.shape
        if local:  # an image taller than image_size: its codes keep their grid, row for row
            tall = np.concatenate([imgs[:1], imgs[1:]], axis=1)   # [1, 32, 16, 3]
            codes = vqgan.encode(params, tall, c)
            assert codes.shape == (1, 4, 2)
            np.testing.assert_array_equal(codes[0], np.concatenate(list(vqgan.encode(params, imgs, c))))
    assert max(latents[True][0, 0], latents[True][0, 1], latents[True][1, 0]) < 1e-6  # untouched patches
    assert latents[True][1, 1] > 1e-2
    assert (latents[False] > 1e-3).all()  # the global encoder's latents all see the change


def test_same_patch_code_entropy():
    from cm3leon_jax.vq_tokenizer import same_patch_code_entropy
    imgs = np.zeros((2, 16, 16, 3), np.uint8)
    imgs[1, :8, :8] = 200  # one unique patch; seven identical black ones
    consistent = np.array([[[1, 1], [1, 1]], [[5, 1], [1, 1]]])
    out = same_patch_code_entropy(imgs, consistent)
    assert out["same_patch_code_entropy_nats"] == 0.0 and out["repeated_patch_share"] == 7 / 8
    noisy = np.array([[[1, 1], [1, 1]], [[5, 1], [2, 1]]])  # black patches coded 1 (x6) and 2 (x1)
    p = np.array([6, 1]) / 7
    np.testing.assert_allclose(same_patch_code_entropy(imgs, noisy)["same_patch_code_entropy_nats"],
                               -np.sum(p * np.log(p)))


# ------------------------------------------------------------------------------ losses


def test_normalize_images_pixel_scale():
    """The default stays today's x / 127.5 - 1 op bit for bit; another scale (Chameleon's) is its
    float64-rounded table exactly on all 256 values; float input passes through."""
    x = jnp.arange(256, dtype=jnp.uint8)
    today = np.asarray(x.astype(jnp.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(np.asarray(vqgan.normalize_images(x)), today)
    assert vqgan.VQGANConfig().pixel_scale == vqgan.PIXEL_SCALE
    cham = np.asarray(vqgan.normalize_images(x, vqgan.CHAMELEON_PIXEL_SCALE))
    np.testing.assert_array_equal(cham, (np.arange(256) * 0.0078).astype(np.float32) - np.float32(1))
    f = jnp.linspace(-1, 1, 5)
    np.testing.assert_array_equal(np.asarray(vqgan.normalize_images(f, 0.0078)), np.asarray(f))
    # to_uint8 inverts it at the same scale (Chameleon's 0.0078 maps 255 to 0.989, not 1)
    for scale, normalised in ((vqgan.PIXEL_SCALE, today), (vqgan.CHAMELEON_PIXEL_SCALE, cham)):
        np.testing.assert_array_equal(np.asarray(vqgan.to_uint8(normalised, scale)), np.arange(256))
    np.testing.assert_array_equal(np.asarray(vqgan.to_uint8(jnp.asarray([-3.0, 3.0]), 0.0078)), [0, 255])
    for dtype in (np.int32, np.uint16, np.bool_):  # other pixels would pass for normalised floats
        with pytest.raises(TypeError, match=r"uint8 \[0, 255\] or float"):
            vqgan.normalize_images(np.zeros((1, 2, 2, 3), dtype))


def test_psnr_known_values():
    x = jnp.zeros((2, 4, 4, 3))
    y = jnp.full((2, 4, 4, 3), 0.1)  # mse 0.01, range 2 -> 10*log10(4/0.01)
    assert float(vq_losses.psnr(x, y)) == pytest.approx(10 * np.log10(400.0), rel=1e-5)
    y2 = y.at[1].set(0.2)  # per-image average, not batch MSE
    expected = 0.5 * (10 * np.log10(400.0) + 10 * np.log10(100.0))
    assert float(vq_losses.psnr(x, y2)) == pytest.approx(expected, rel=1e-5)
    assert float(vq_losses.psnr(x, x)) == pytest.approx(100.0)
    assert float(vq_losses.l1_loss(x, y)) == pytest.approx(0.1, rel=1e-5)
    assert float(vq_losses.l2_loss(x, y)) == pytest.approx(0.01, rel=1e-5)


def test_hinge_losses_and_gate():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.0])
    # relu(1-real) = [0, .5, 2] -> 5/6 ; relu(1+fake) = [0, 1, 2] -> 1
    assert float(vq_losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1.0), rel=1e-6)
    assert float(vq_losses.hinge_g_loss(fake)) == pytest.approx(1 / 3, rel=1e-6)
    gate = jax.jit(vq_losses.disc_gate, static_argnums=1)
    assert float(gate(99, 100)) == 0.0 and float(gate(100, 100)) == 1.0


def test_adaptive_weight_is_gradient_norm_ratio():
    a = jnp.array([[3.0, 4.0]])  # ||a|| = 5
    b = jnp.array([[0.0, 2.0]])  # ||b|| = 2
    w = jax.jit(lambda k: vq_losses.adaptive_generator_weight(
        lambda p: jnp.sum(a * p), lambda p: jnp.sum(b * p), k))(jnp.ones((1, 2)))
    assert float(w) == pytest.approx(5.0 / (2.0 + 1e-4), rel=1e-6)
    # Clipped when the GAN gradient vanishes; never differentiated through.
    w0 = vq_losses.adaptive_generator_weight(lambda p: jnp.sum(a * p), lambda p: 0.0 * jnp.sum(p),
                                             jnp.ones((1, 2)), max_weight=10.0)
    assert float(w0) == 10.0


def test_perceptual_loss_default_off_and_loads_npz(tmp_path):
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    assert vq_losses.load_perceptual_weights(vq_losses.VQLossConfig().perceptual_weights_path) is None
    assert float(vq_losses.perceptual_loss(None, x, y)) == 0.0

    rs = np.random.RandomState(0)
    arrays = {
        "stage0_conv0.kernel": rs.randn(3, 3, 3, 4).astype(np.float32) * 0.3,
        "stage0_conv0.bias": np.zeros(4, np.float32),
        "stage1_conv0.kernel": rs.randn(3, 3, 4, 6).astype(np.float32) * 0.3,
        "stage1_conv0.bias": np.zeros(6, np.float32),
        "stage1_conv1/kernel": rs.randn(3, 3, 6, 6).astype(np.float32) * 0.3,
        "stage1_conv1/bias": np.full(6, 0.01, np.float32),
        "lin0": np.abs(rs.randn(4)).astype(np.float32),
        "lin1": np.abs(rs.randn(6)).astype(np.float32),
    }
    path = tmp_path / "vgg_tiny.npz"
    np.savez(path, **arrays)
    w = vq_losses.load_perceptual_weights(str(path))
    assert vq_losses._stages_from_params(w["params"]) == ((4,), (6, 6))
    ploss = jax.jit(vq_losses.perceptual_loss)
    d_xy = float(ploss(w, x, y))
    assert d_xy > 0.0 and np.isfinite(d_xy)
    assert float(ploss(w, x, x)) == pytest.approx(0.0, abs=1e-7)

    from safetensors.numpy import save_file
    st = tmp_path / "vgg_tiny.safetensors"
    save_file(arrays, str(st))
    assert float(ploss(vq_losses.load_perceptual_weights(str(st)), x, y)) == pytest.approx(d_xy, rel=1e-5)

    # shapes VGGFeatures cannot apply (or negative LPIPS weights) are refused at load, naming the tensor,
    # not in the first compiled training step
    oihw = rs.randn(6, 4, 3, 3).astype(np.float32)
    for bad, match in ((dict(arrays, lin0=np.ones(5, np.float32)), "lin0 must be 4 non-negative"),
                       (dict(arrays, lin1=-np.ones(6, np.float32)), "lin1 must be 6 non-negative"),
                       ({**arrays, "stage1_conv0.kernel": oihw}, r"stage1_conv0.kernel .* OIHW"),
                       ({**arrays, "stage0_conv0.bias": np.zeros(5, np.float32)}, "stage0_conv0.bias")):
        np.savez(tmp_path / "wrong.npz", **bad)
        with pytest.raises(ValueError, match=match):
            vq_losses.load_perceptual_weights(str(tmp_path / "wrong.npz"))

    np.savez(tmp_path / "bad.npz", **{"conv.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError):
        vq_losses.load_perceptual_weights(str(tmp_path / "bad.npz"))


def test_edge_weights_favour_outlines_and_keep_the_loss_scale(tiny):
    flat = jnp.full((1, 8, 8, 3), 0.2)
    np.testing.assert_allclose(vq_losses.edge_weights(flat, 8.0), 1.0, rtol=1e-6)  # no edges: plain loss
    square = np.full((1, 8, 8, 3), -1.0, np.float32)
    square[0, 2:6, 2:6] = 1.0
    w = np.asarray(vq_losses.edge_weights(jnp.asarray(square), 8.0))[0, :, :, 0]
    assert w.shape == (8, 8) and w.mean() == pytest.approx(1.0, rel=1e-5)
    assert w[2, 2] == w[1, 3] == w.max() and w[0, 0] == w.min() and w.max() / w.min() == pytest.approx(9.0)
    assert w[3, 3] == w[0, 0]  # inside the square: flat again

    cfg, params = tiny
    images = _toy_images(2)
    plain = vq_losses.vq_loss_fn(params, None, images, None, 0, cfg, vq_losses.VQLossConfig(disc_weight=0.0))
    edged = vq_losses.vq_loss_fn(params, None, images, None, 0, cfg,
                                 vq_losses.VQLossConfig(disc_weight=0.0, edge_weight=8.0))
    assert float(edged[0]) != pytest.approx(float(plain[0]), rel=1e-3)  # the option reaches the loss
    x = vqgan.normalize_images(jnp.asarray(images), cfg.pixel_scale)
    weights = vq_losses.edge_weights(x, 8.0)
    expected_l1 = float(jnp.mean(weights * jnp.abs(edged[1]["recon"] - x)))
    assert float(edged[1]["metrics"]["recon_l1"]) == pytest.approx(expected_l1, rel=1e-5)


def test_perceptual_path_without_weights_is_an_error(tiny):
    cfg, params = tiny
    lcfg = vq_losses.VQLossConfig(perceptual_weights_path="/some/vgg.npz", disc_weight=0.0)
    with pytest.raises(ValueError, match="perceptual"):
        vq_losses.vq_loss_fn(params, None, _toy_images(1), None, 0, cfg, lcfg)


# ------------------------------------------------------------------------------ training


def test_tiny_model_overfits_with_gan_and_reseeding(tiny):
    cfg, params = tiny
    lcfg = vq_losses.VQLossConfig(disc_start=15, disc_weight=0.1, disc_channels=8, disc_layers=2)
    images = jnp.asarray(_toy_images(4))
    disc_params = vq_losses.init_discriminator(jax.random.PRNGKey(1), lcfg, (16, 16, 3))
    g_opt, d_opt = optax.adam(3e-3), optax.adam(1e-4)
    state = (params, disc_params, g_opt.init(params), d_opt.init(disc_params),
             jnp.zeros(cfg.codebook_size))

    @jax.jit
    def train_step(state, step, rng):
        params, disc_params, g_state, d_state, usage = state
        (_, aux), g = jax.value_and_grad(vq_losses.vq_loss_fn, has_aux=True)(
            params, disc_params, {"image": images}, rng, step, cfg, lcfg)
        upd, g_state = g_opt.update(g, g_state, params)
        params = optax.apply_updates(params, upd)
        (_, d_metrics), dg = jax.value_and_grad(vq_losses.disc_loss_fn, has_aux=True)(
            disc_params, images, aux["recon"], step, lcfg)
        dupd, d_state = d_opt.update(dg, d_state, disc_params)
        disc_params = optax.apply_updates(disc_params, dupd)
        usage = vqgan.update_usage(usage, aux["counts"], decay=0.9)
        params, _ = jax.lax.cond(
            step % 10 == 9,
            lambda p: vqgan.reseed_params(p, usage, aux["encodings"], rng, threshold=0.01),
            lambda p: (p, jnp.zeros(cfg.codebook_size, bool)), params)
        return (params, disc_params, g_state, d_state, usage), {**aux["metrics"], **d_metrics}

    history = []
    for step in range(30):
        state, m = train_step(state, jnp.int32(step), jax.random.PRNGKey(step))
        history.append(jax.device_get(m))

    for m in history:
        assert all(np.isfinite(v) for v in m.values()), m
    assert all(m["disc_factor"] == 0 and m["gan_g_loss"] == 0 for m in history[:15])
    assert all(m["disc_factor"] == 1 and m["adaptive_weight"] > 0 for m in history[15:])
    first = history[0]["recon_l1"] + history[0]["recon_l2"]
    last = min(m["recon_l1"] + m["recon_l2"] for m in history[-5:])
    assert last < 0.6 * first, (first, last)
    assert history[-1]["psnr"] > history[0]["psnr"] + 3.0
