"""VQ tokenizer training (cm3leon_jax.train_vq), its image data (data_pipeline.images) and the
tokenizer API. One minuscule run (16x16 images -> 8x8 codes, 8-channel two-level model, mesh
data=4 x fsdp=2) is shared by the tests through a module fixture; a persistent compilation cache
lets the resumed run reuse the first run's compiled programs (compilation dominates on 2 cores)."""
import json
import os
import struct
import sys
import zlib

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from cm3leon_jax import train_vq
from data_pipeline import images as image_data
from experiments import vq_tiny
from tests.helpers import REPO

TINY_FLAGS = [
    "--config.total_steps=6", "--config.log_every_steps=2", "--config.checkpoint_every_steps=3",
    "--config.sample_every_steps=3", "--config.num_sample_images=4", "--config.mesh.data=4", "--config.mesh.fsdp=2",
    "--config.vq.image_size=16", "--config.vq.patch_size=1", "--config.vq.channels=8", "--config.vq.channel_multipliers=(1,2)",
    "--config.vq.attention_at_lowest=false", "--config.vq.num_res_blocks=1",
    "--config.vq.codebook_size=128", "--config.vq.code_dim=4", "--config.vq.embed_dim=8", "--config.vq.num_groups=4",
    "--config.loss.disc_start=3", "--config.loss.disc_weight=0.1", "--config.loss.disc_channels=8",
    "--config.loss.disc_layers=1", "--config.codebook.reseed_every_steps=2", "--config.codebook.dead_threshold=0.5", "--config.codebook.usage_window_steps=4",
    "--config.data.global_batch_size=8", "--config.optimizer.warmup_steps=0", "--config.async_checkpointing=false",
]
LOGGED = ("loss", "recon_loss", "recon_l1", "recon_l2", "psnr", "codebook_usage", "batch_codebook_usage",
          "perplexity", "perplexity_window", "codebook_loss", "commitment_loss", "gan_g_loss", "disc_loss",
          "logits_real", "logits_fake", "adaptive_weight", "disc_factor", "grad_norm", "learning_rate",
          "reseeded_total", "images_per_second", "step_time")


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run_cli(workdir, *extra):
    """`python -m cm3leon_jax.train_vq --config experiments/vq_tiny.py --workdir DIR ...`, in-process."""
    argv = ["train_vq", "--config", os.path.join(REPO, "experiments", "vq_tiny.py"), "--workdir", str(workdir),
            *TINY_FLAGS, *extra]
    saved_argv = sys.argv
    sys.argv = argv  # ml_collections reads the --config.X overrides from sys.argv
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
        config = flags.FLAGS.config
        train_vq.main([])
    finally:
        flags.FLAGS.unparse_flags()
        sys.argv = saved_argv
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vq_run")
    config = _run_cli(workdir)
    return workdir, config


def test_cli_trains_logs_samples_and_checkpoints(trained):
    workdir, _ = trained
    records = _records(workdir)
    train = {r["step"]: r for r in records if "loss" in r}
    val = {r["step"]: r for r in records if "val_psnr" in r}
    assert sorted(train) == [2, 4, 6] and sorted(val) == [3, 6]
    for step in (4, 6):
        for key in LOGGED:
            assert np.isfinite(train[step][key]), (step, key)
    assert 0.0 < train[6]["codebook_usage"] <= 1.0 and 1.0 <= train[6]["perplexity"] <= 128
    assert train[2]["disc_factor"] == 0 and train[2]["disc_loss"] == 0  # the GAN starts at step 3
    assert train[6]["disc_factor"] == 1 and train[6]["adaptive_weight"] > 0 and train[6]["disc_loss"] > 0
    assert train[6]["reseeded_total"] > 0  # dead codes were re-seeded
    assert train[6]["skipped_steps"] == train[6]["disc_skipped_steps"] == train[6]["nonfinite_streak"] == 0
    assert np.isfinite(val[6]["val_psnr"])

    grid = Image.open(workdir / "samples" / "step_000006.png")
    assert grid.size == (4 * 18 + 2, 2 * 18 + 2) and grid.mode == "RGB"  # 4 originals over 4 reconstructions
    assert os.path.exists(workdir / "samples" / "step_000003.png")
    assert {"3", "6"} <= set(os.listdir(workdir / "checkpoints"))
    vq_config = json.load(open(workdir / "vq_config.json"))
    assert vq_config["image_size"] == 16 and vq_config["codebook_size"] == 128
    assert json.load(open(workdir / "config.json"))["mesh"]["fsdp"] == 2


def test_resume_continues_from_saved_step(trained):
    workdir, config = trained
    before = _records(workdir)
    config = config.copy_and_resolve_references()
    config.total_steps = 8
    config.num_sample_images = 0  # no sample grid (nor val_psnr) at the end, rather than a crash
    train_vq.train(config, str(workdir))
    after = _records(workdir)
    assert after[:len(before)] == before  # nothing before step 6 rewritten
    new = [r for r in after[len(before):] if "loss" in r]
    assert [r["step"] for r in new] == [8]
    assert not any("val_psnr" in r for r in after[len(before):])
    assert not os.path.exists(workdir / "samples" / "step_000008.png")
    assert "8" in os.listdir(workdir / "checkpoints")
    # the data position was restored too: the resumed iterator continues where step 6 left off
    it = image_data.make_train_iterator(config, 0, 1)
    it.set_state(open(workdir / "checkpoints" / "6" / "data" / "process_0-of-1.json", "rb").read())
    assert json.loads(it.get_state())["state"]["next_index"] == 6


def test_a_run_stopped_by_its_time_budget_logs_its_last_step(trained, tmp_path):
    """bench/vq.py reads the last logged metrics: a budget stop between log steps left them empty."""
    _, config = trained
    config = config.copy_and_resolve_references()
    config.update(total_steps=12, log_every_steps=10, checkpoint_every_steps=100, max_train_seconds=1e-6,
                  num_sample_images=0)
    last = train_vq.train(config, str(tmp_path))
    assert last["final_step"] == 1 and not last["preempted"] and np.isfinite(last["psnr"])
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1]
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_a_diverging_tokenizer_run_skips_its_nan_updates_then_stops_clearly(trained, tmp_path):
    _, config = trained
    config = config.copy_and_resolve_references()
    # the first update at a learning rate of 1e30 overflows every later forward pass
    config.update(total_steps=12, log_every_steps=2, checkpoint_every_steps=2, sample_every_steps=1000)
    config.optimizer.update(lr=1e30, skip_nonfinite=2)
    with pytest.raises(FloatingPointError, match=r"skip_nonfinite=2.*last checkpoint is step 2"):
        train_vq.train(config, str(tmp_path))
    records = {r["step"]: r for r in _records(tmp_path) if "loss" in r}
    assert sorted(records) == [2, 4] and [records[s]["skipped_steps"] for s in (2, 4)] == [1, 3]
    assert records[4]["nonfinite_streak"] == 3
    assert max(int(d) for d in os.listdir(tmp_path / "checkpoints")) == 2   # the stopping step saves none
    # the checkpoint inside the streak holds finite parameters: skipped steps re-seed no codes either
    from cm3leon_jax import checkpointing, sharding
    t = train_vq.VQTrainer(config, sharding.make_mesh(config.mesh))
    params, _ = checkpointing.restore_params(str(tmp_path), t.abstract_state.params)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(params)))


def test_config_errors_are_caught_before_any_compilation():
    from cm3leon_jax import sharding
    config = vq_tiny.get_config()  # mesh.data=-1: all devices, batch 8
    mesh = sharding.make_mesh(config.mesh)
    train_vq.validate_config(config, mesh, 1)
    config.vq.in_channels = 1  # used to fail in Flax's param-shape check at the first step
    with pytest.raises(ValueError, match="in_channels=1.*RGB"):
        train_vq.validate_config(config, mesh, 1)
    config.vq.in_channels, config.num_sample_images = 3, -1
    with pytest.raises(ValueError, match="num_sample_images"):
        train_vq.validate_config(config, mesh, 1)
    config.num_sample_images, config.codebook.usage_decay = 8, 1.0  # silently never re-seeded a code
    with pytest.raises(ValueError, match="usage_decay"):
        train_vq.validate_config(config, mesh, 1)
    config.codebook.usage_decay, config.data.shapes_seed = 0.99, -1  # failed inside a Grain worker thread
    with pytest.raises(ValueError, match="seed must be >= 0"):
        train_vq.validate_config(config, mesh, 1)
    config.data.shapes_seed, config.vq.codebook_size = 0, 0  # an empty codebook failed inside Flax
    with pytest.raises(ValueError, match="codebook_size=0"):
        train_vq.validate_config(config, mesh, 1)
    config.vq.codebook_size, config.optimizer.eps = 128, 0.0   # NaN parameters after the first update
    with pytest.raises(ValueError, match="optimizer.eps=0.0 must be > 0"):
        train_vq.validate_config(config, mesh, 1)
    config.optimizer.eps, config.optimizer.disc_lr = 1e-8, -1e-4   # the discriminator trained the wrong way
    with pytest.raises(ValueError, match="optimizer.disc_lr=-0.0001 must be >= 0"):
        train_vq.validate_config(config, mesh, 1)


@pytest.mark.parametrize("field", ["data.global_batch_size", "log_every_steps", "keep_checkpoints",
                                   "checkpoint_every_steps"])
def test_counts_below_one_are_refused_up_front(field):
    """0 failed inside Grain or as a modulo by zero after the first compiled step, or kept/saved no checkpoint right."""
    from cm3leon_jax import config_defaults, sharding
    config = vq_tiny.get_config()
    mesh = sharding.make_mesh(config.mesh)
    config_defaults.set_field(config, field, 0)
    with pytest.raises(ValueError, match=f"{field}=0 must be >= 1"):
        train_vq.validate_config(config, mesh, 1)


@pytest.mark.parametrize("field, value", [("loss.l1_weight", float("nan")), ("loss.disc_weight", float("inf")),
                                          ("loss.codebook_weight", -1.0), ("loss.disc_channels", 0)])
def test_invalid_loss_fields_are_refused_up_front(field, value):
    """NaN/inf weights made every loss NaN, a negative one trained backwards, 0 channels failed in JAX's init."""
    from cm3leon_jax import config_defaults, sharding
    config = vq_tiny.get_config()
    config_defaults.set_field(config, field, value)
    with pytest.raises(ValueError, match=f"{field}={value} must be >= "):
        train_vq.validate_config(config, sharding.make_mesh(config.mesh), 1)


@pytest.mark.parametrize("field, value", [("codebook.dead_threshold", float("nan")), ("codebook.reseed_noise", -1e-3),
                                          ("codebook.reseed_every_steps", -1), ("optimizer.grad_clip", -1.0),
                                          ("max_train_seconds", float("nan")), ("sample_every_steps", -5),
                                          ("loss.disc_start", -1), ("data.num_threads", -2)])
def test_negative_or_nan_settings_are_refused_up_front(field, value):
    """0 turns these off; a negative or NaN one was accepted without a word."""
    from cm3leon_jax import config_defaults, sharding
    config = vq_tiny.get_config()
    config_defaults.set_field(config, field, value)
    with pytest.raises(ValueError, match=f"{field}=.* must be a finite number >= 0"):
        train_vq.validate_config(config, sharding.make_mesh(config.mesh), 1)


def test_tokenizer_loads_from_workdir(trained):
    workdir, _ = trained
    params, config = train_vq.load_tokenizer(str(workdir))
    assert config.codebook_size == 128 and config.latent_size == 8
    assert "encoder" in params and "quantizer" in params and "decoder" in params
    tok = train_vq.VQTokenizer.from_workdir(str(workdir), batch_size=4)
    images = np.random.RandomState(0).randint(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    codes = tok.encode(images)
    assert codes.shape == (5, 8, 8) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 128
    np.testing.assert_array_equal(tok.encode(images[1]), codes[1])  # one image, no batch dim
    out = tok.decode(codes)
    assert out.shape == (5, 16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(tok.decode(codes[0]), out[0])
    with pytest.raises(ValueError):
        tok.decode(np.full((1, 8, 8), 128))
    with pytest.raises(ValueError):
        tok.encode(np.zeros((1, 24, 24, 3), np.uint8))
    with pytest.raises(TypeError):
        tok.encode(images.astype(np.float32))


def _folder_config(image_dir, batch=8):
    config = vq_tiny.get_config()
    config.vq.image_size = 16
    config.data.update(image_dir=str(image_dir), global_batch_size=batch, num_threads=1)
    config.num_sample_images = 2
    return config


def _png_with_garbage_pixels() -> bytes:
    """A PNG whose chunks (and CRCs) are well formed but whose IDAT is not zlib data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"garbage" * 9) + chunk(b"IEND", b"")


def test_image_folder_skips_and_counts_unreadable_files(tmp_path):
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 256, (40, 30, 3)).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rs.randint(0, 256, (20, 50, 4)).astype(np.uint8), "RGBA").save(tmp_path / "b.PNG")
    Image.fromarray(rs.randint(0, 256, (64, 64)).astype(np.uint8), "L").save(tmp_path / "c.jpg")
    os.makedirs(tmp_path / "sub")
    Image.fromarray(rs.randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(tmp_path / "sub" / "d.jpeg")
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all" * 10)
    (tmp_path / "bad_pixels.png").write_bytes(_png_with_garbage_pixels())  # passes verify(), fails to decode
    (tmp_path / "notes.txt").write_text("ignored")

    it = image_data.make_train_iterator(_folder_config(tmp_path), 0, 1)
    assert it.skipped["unreadable_image"] == 1  # the corrupt file, at the scan
    for _ in range(3):
        batch = next(it)["image"]
        assert batch.shape == (8, 16, 16, 3) and batch.dtype == np.uint8
    assert it.skipped["unreadable_image"] == 2  # and the one whose pixels do not decode, when read

    val = image_data.validation_images(_folder_config(tmp_path), 2)
    assert val.shape == (2, 16, 16, 3) and val.dtype == np.uint8


def test_no_sample_images_holds_nothing_out(tmp_path):
    """num_sample_images=0: a folder keeps all its images for training and none for the grid (the
    hold-out slice paths[:-0] used to empty the training source, and paths[-0:] to load the folder)."""
    for i in range(5):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    config = _folder_config(tmp_path)
    config.num_sample_images = 0
    assert len(image_data.make_train_source(config)) == 5
    assert image_data.validation_images(config, 0).shape == (0, 16, 16, 3)
    config.data.image_dir = ""  # the shapes world
    assert image_data.validation_images(config, 0).shape == (0, 16, 16, 3)


def test_user_images_are_converted_as_in_training(tmp_path):
    """generate --image / --task read a user's file as ingestion and VQ training do (centre crop,
    transparency onto white), not squashed to a square with its transparent pixels black."""
    from cm3leon_jax import sft_generate
    rgba = np.zeros((16, 32, 4), np.uint8)
    rgba[:, :16], rgba[:, 16:], rgba[:4] = (255, 0, 0, 255), (0, 0, 255, 255), (0, 0, 0, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "wide.png")
    loaded = image_data.load_image(str(tmp_path / "wide.png"), 16)
    np.testing.assert_array_equal(loaded, image_data.center_crop_resize(Image.open(tmp_path / "wide.png"), 16))
    assert loaded.shape == (16, 16, 3) and (loaded[0] == 255).all()  # the transparent rows are white
    assert (loaded[8, 0] == (255, 0, 0)).all() and (loaded[8, 15] == (0, 0, 255)).all()  # cropped: both halves
    np.testing.assert_array_equal(sft_generate._resize(rgba, 16), loaded)
    assert sft_generate._resize(rgba[:, :16], 16).shape == (16, 16, 3)  # a square RGBA array loses its alpha


def test_a_long_strip_is_cut_to_its_centre_before_resizing(monkeypatch):
    """A 2 x 2,000 banner at 16 px used to be resized whole to 16 x 16,000 (long/short times the
    work and memory of the crop: GBs at 256 px); only its centre is resized now, with the same
    centre crop."""
    strip = np.zeros((2000, 2, 3), np.uint8)
    strip[990:1010] = (255, 0, 0)  # a red band in the middle, the rest black
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a, **k))
    out = image_data.center_crop_resize(strip, 16)
    assert out.shape == (16, 16, 3) and max(max(s) for s in sizes) <= 2 * 16 + 1
    assert (out[:, :, 0] > 200).all() and (out[:, :, 1:] < 30).all()  # the centre 2 x 2 rows -> all red
    wide = image_data.center_crop_resize(strip.transpose(1, 0, 2), 16)
    np.testing.assert_array_equal(wide, out.transpose(1, 0, 2))


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored sideways with an EXIF orientation tag (as phones write them) is read upright,
    as every viewer shows it, by VQ training, ingestion and generate alike."""
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (0, 0, 255)  # stored: blue left half, black right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif.tobytes())
    shown = np.rot90(pixels, k=-1)  # [32, 16]: blue on top
    loaded = image_data.load_image(str(tmp_path / "phone.png"), 16)
    np.testing.assert_array_equal(loaded, image_data.center_crop_resize(shown, 16))
    assert (loaded[:8, :, 2] > 200).all() and (loaded[8:, :, 2] < 50).all()
    Image.fromarray(pixels).save(tmp_path / "plain.png")  # no tag: as stored
    np.testing.assert_array_equal(image_data.load_image(str(tmp_path / "plain.png"), 16),
                                  image_data.center_crop_resize(pixels, 16))


def test_image_grid_takes_any_count_and_refuses_what_it_would_wrap(tmp_path):
    from cm3leon_jax import image_grid
    img = np.full((4, 4, 3), 7, np.uint8)
    assert image_grid.make_grid([[img] * 7]).shape == (8, 7 * 6 + 2, 3)  # a prime count, one row
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    for form in (grey, grey[..., None], np.dstack([grey] * 3 + [np.zeros_like(grey)])):  # grey, [H,W,1], RGBA
        np.testing.assert_array_equal(image_grid.make_grid([[form]], pad=0), np.dstack([grey] * 3))
    for bad in (np.full((4, 4, 3), 300, np.int32), np.full((4, 4, 3), 0.5, np.float32)):  # used to wrap / go black
        with pytest.raises(TypeError, match="uint8"):
            image_grid.make_grid([[img, bad]])
        with pytest.raises(TypeError, match="uint8"):
            image_grid.save_png(str(tmp_path / "x.png"), bad)


def test_colour_keyed_transparency_is_white_too(tmp_path):
    """A PNG's tRNS colour key makes the pixels of one colour transparent in an RGB or grey image
    (not only in a palette one): they come out white, as alpha does, not in the colour they hide."""
    for mode, key, mark in (("RGB", (0, 255, 0), (255, 0, 0)), ("L", 7, 200)):
        image = Image.new(mode, (4, 4), key)
        image.putpixel((0, 0), mark)
        image.save(tmp_path / f"{mode}.png", transparency=key)
        rgb = np.asarray(image_data.to_rgb(Image.open(tmp_path / f"{mode}.png")))
        assert (rgb[1:, 1:] == 255).all()  # the keyed colour
        np.testing.assert_array_equal(rgb[0, 0], np.broadcast_to(mark, 3))  # the rest as it was
    # a 16-bit grey PNG's key is a 16-bit value: it was lost with the scaling to 8 bits
    deep = np.full((4, 4), 1000, np.uint16)
    deep[0, 0] = 40_000
    Image.fromarray(deep).save(tmp_path / "deep.png", transparency=1000)
    rgb = np.asarray(image_data.to_rgb(Image.open(tmp_path / "deep.png")))
    assert (rgb[1:, 1:] == 255).all() and (rgb[0, 0] == round(40_000 / 257)).all()


def test_premultiplied_alpha_composites_like_plain_alpha():
    """PIL's premultiplied modes (La, RGBa) come out as their plain-alpha twins do: La used to be
    unreadable ("conversion from La to L not supported") and RGBa dropped its alpha."""
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[..., :3], pixels[..., 3] = (200, 10, 10), [[255, 0], [128, 0]]
    rgba = Image.fromarray(pixels, "RGBA")
    grey = Image.fromarray(pixels[..., [0, 3]], "LA")
    for plain, premultiplied in ((rgba, rgba.convert("RGBa")), (grey, grey.convert("La"))):
        expected = np.asarray(image_data.to_rgb(plain))
        assert (expected[0, 1] == 255).all()  # a transparent pixel is white
        np.testing.assert_array_equal(np.asarray(image_data.to_rgb(premultiplied)), expected)


def test_image_iterator_state_and_process_slices():
    config = vq_tiny.get_config()
    config.vq.image_size = 16
    config.data.update(global_batch_size=4, num_threads=1)
    it = image_data.make_train_iterator(config, 0, 1)
    first = next(it)["image"]
    state = it.get_state()
    expected = [next(it)["image"] for _ in range(2)]
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["image"], expected[0])
    # two processes each read half the rows of the same global batch
    halves = [next(image_data.make_train_iterator(config, p, 2))["image"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), first)
    with pytest.raises(ValueError):
        image_data.make_train_iterator(config, 1, 2).set_state(state)
    # ... but the saved position resumes on two processes through set_state_from_processes
    # (what CheckpointManager.restore calls when the process count changed)
    resumed = [image_data.make_train_iterator(config, p, 2) for p in range(2)]
    for r in resumed:
        r.set_state_from_processes([state])
    np.testing.assert_array_equal(np.concatenate([next(r)["image"] for r in resumed]), expected[0])
    np.testing.assert_array_equal(np.concatenate([next(r)["image"] for r in resumed]), expected[1])
    with pytest.raises(ValueError, match="different positions"):
        resumed[0].set_state_from_processes([state, resumed[1].get_state()])


@pytest.mark.parametrize("decay", [0.9, 0.0])
def test_reseed_grace_stays_finite_for_a_short_usage_ema(decay):
    """A re-seeded code's grace usage was threshold / decay ** reseed_every_steps: inf in float32 for
    decay 0.9 over 1,000 steps (never dead again, perplexity_window NaN), a ZeroDivisionError for 0."""
    import jax.numpy as jnp
    from cm3leon_jax import sharding, vqgan
    config = vq_tiny.get_config()
    config.codebook.update(usage_decay=decay, reseed_every_steps=1000)
    config.vq.update(image_size=16, channels=8, codebook_size=64, embed_dim=8, patch_size=1, channel_multipliers=(1, 2))
    mesh = sharding.make_mesh(config.mesh)
    train_vq.validate_config(config, mesh, 1)
    trainer = train_vq.VQTrainer(config, mesh)
    params = {"quantizer": {"codebook": vqgan.l2_normalize(jax.random.normal(jax.random.key(0), (64, 8)))}}
    usage = jnp.zeros((64,)).at[0].set(1.0)   # only code 0 in use: the other 63 are dead
    encodings = jax.random.normal(jax.random.key(1), (4, 4, 8))
    _, _, usage, reseeded = jax.jit(lambda p, u, e: trainer._reseed(p, {}, u, e, jnp.asarray(999)))(params, usage, encodings)
    assert int(reseeded) == 63
    assert np.isfinite(np.asarray(usage)).all() and float(usage[1]) > 0
    assert np.isfinite(float(vqgan.perplexity_from_counts(usage)))
    assert float(usage[1] * decay ** 10_000) < float(config.codebook.dead_threshold) / 64   # dead again once unused


def test_resume_refuses_another_held_out_count_of_a_folder(tmp_path):
    """A folder's last num_sample_images files are held out of training: resuming with another count
    reordered the data under the saved position, and check_resume_keeps_data_order (data.*, seed)
    let it through."""
    config = vq_tiny.get_config()
    config.data.image_dir, config.num_sample_images = str(tmp_path / "images"), 8
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    train_vq.check_resume_keeps_held_out(str(tmp_path), config)   # unchanged: fine
    changed = config.copy_and_resolve_references()
    changed.num_sample_images = 0
    with pytest.raises(ValueError, match="num_sample_images=8.*holds out 0"):
        train_vq.check_resume_keeps_held_out(str(tmp_path), changed)
    changed.allow_data_change_on_resume = True
    train_vq.check_resume_keeps_held_out(str(tmp_path), changed)
    shapes = vq_tiny.get_config()   # the shapes world holds nothing out: the sample count is free
    (tmp_path / "config.json").write_text(shapes.to_json_best_effort())
    shapes.num_sample_images = 0
    train_vq.check_resume_keeps_held_out(str(tmp_path), shapes)


def test_resume_refuses_a_vq_config_that_reinterprets_the_weights(tmp_path):
    """norm, l2_normalize_codes and local_encoder leave the parameter shapes alone: a resume that
    changed one restored the weights into another model and rewrote vq_config.json."""
    import dataclasses
    from cm3leon_jax import vqgan
    saved = vqgan.VQGANConfig.from_config(vq_tiny.get_config().vq)
    train_vq.save_vq_config(str(tmp_path), saved)
    train_vq.check_resume_keeps_vq_config(str(tmp_path), saved)
    train_vq.check_resume_keeps_vq_config(str(tmp_path), dataclasses.replace(saved, dtype="bfloat16"))   # free
    for change in (dict(norm="layer"), dict(local_encoder=True), dict(l2_normalize_codes=True)):
        with pytest.raises(ValueError, match=f"vq.{next(iter(change))}"):
            train_vq.check_resume_keeps_vq_config(str(tmp_path), dataclasses.replace(saved, **change))
    train_vq.check_resume_keeps_vq_config(str(tmp_path / "fresh"), dataclasses.replace(saved, norm="layer"))
