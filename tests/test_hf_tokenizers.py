"""The tokenizers of an imported Chameleon checkpoint: its tokenizer.json behind our Vocabulary
(hf_text_tokenizer) and its VQ encoder in our VQGAN (hf_vq), and the imported workdir's vocab/ and
vq/ as the rest of the code loads them.

VQ latents are compared with transformers' in float32 at 1e-4 absolute (measured ~2e-6 on
latents of magnitude ~1); codes must be equal. Everything is tiny: 16x16 images, 32-64 channels.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

from cm3leon_jax import hf_interop, hf_vq, import_hf, model as model_lib, vqgan
from tests import helpers

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "tokenizers")),
    reason="needs the interop extra (torch, transformers, tokenizers)")
LATENT_ATOL = 1e-4
TINY_VQ = dict(resolution=16, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[8],
               embed_dim=4, num_embeddings=16, latent_channels=8)
TEXT = "a small red circle at the top left, ünïcode 日本 and a literal </s> <sentinel:0>"



def _hf_vocab(tokenizer_json):
    from tokenizers import Tokenizer
    return Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True)


def _vocabulary(tokenizer_json, tokens_per_image=4):
    from cm3leon_jax import hf_text_tokenizer, vocab as vocab_lib
    hf_vocab = _hf_vocab(tokenizer_json)
    m = hf_interop.vocab_mapping(hf_vocab, max(hf_vocab.values()) + 1)
    lay = m["layout"]
    tok = hf_text_tokenizer.HFTextTokenizer(tokenizer_json.encode(), m["ours_to_hf"][lay["text_offset"]:lay["image_offset"]])
    return vocab_lib.Vocabulary(tok, lay["num_image_codes"], tokens_per_image, lay["num_sentinels"]), m


def test_tokenizer_json_round_trips_documents_through_our_vocabulary(tmp_path):
    from cm3leon_jax import vocab as vocab_lib
    tj = helpers.chameleon_tokenizer_json()
    vocab, m = _vocabulary(tj)
    assert vocab.num_sentinels == 2 and vocab.num_image_codes == 16
    image = np.arange(4, dtype=np.int32).reshape(2, 2) * 3
    doc = [TEXT, image, "and <mask:1> more <eos> text"]
    tokens = vocab.encode_document(doc)
    back = vocab.decode_document(tokens)
    assert back[0] == TEXT and back[2] == doc[2]
    np.testing.assert_array_equal(back[1], image)
    # our specials are ours; "</s>" and "<sentinel:0>" in text are spelled out as text pieces
    assert vocab.sentinel(1) in tokens and vocab.eos_id in tokens
    text_ids = vocab.encode_text(TEXT)
    assert vocab.is_text(text_ids).all()
    # the same pieces as the tokenizer itself, in HF ids
    from tokenizers import Tokenizer
    hf_ids = Tokenizer.from_str(tj).encode("a small red circle", add_special_tokens=False).ids
    assert [m["ours_to_hf"][i] for i in vocab.encode_text("a small red circle")] == hf_ids
    # HF special tokens that fell into the text range are reserved: never emitted
    for name in ("<s>", "<unk>", "<image>"):
        ours = m["hf_to_ours"][_hf_vocab(tj)[name]]
        assert not any(lo <= ours < hi for lo, hi in vocab.emittable_text_ranges())
        with pytest.raises(ValueError, match="reserved piece"):
            vocab.decode_text(np.asarray([ours]))
    vocab.save(tmp_path / "v")
    assert sorted(os.listdir(tmp_path / "v")) == ["hf_text_ids.json", "tokenizer.json", "vocab.json"]
    loaded = vocab_lib.Vocabulary.load(tmp_path / "v")
    assert loaded.fingerprint == vocab.fingerprint and loaded.decode_document(tokens)[0] == TEXT
    data = json.loads((tmp_path / "v" / "tokenizer.json").read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]  # another tokenizer
    (tmp_path / "v" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"tokenizer\.json does not match .*vocab\.json.*replaced"):
        vocab_lib.Vocabulary.load(tmp_path / "v")
    (tmp_path / "v" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        vocab_lib.Vocabulary.load(tmp_path / "v")


def _chameleon_pixels(images, size, hf_dir=None):
    """transformers' ChameleonImageProcessor (PIL backend) on uint8 images [B, S, S, 3] of its size:
    float32 [B, 3, S, S] (its processor_config.json in hf_dir when given, else its defaults)."""
    from PIL import Image
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil
    if hf_dir is not None:
        proc = ChameleonImageProcessorPil.from_pretrained(str(hf_dir))
    else:
        proc = ChameleonImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc(images=[Image.fromarray(i) for i in images], return_tensors="np")["pixel_values"]


def test_text_ids_that_name_no_token_are_refused_by_name():
    """A hand-edited hf_text_ids.json with a negative or huge id was tokenizers' OverflowError."""
    from cm3leon_jax import hf_text_tokenizer
    tj = helpers.chameleon_tokenizer_json().encode()
    for bad in (-1, 2 ** 40, 10 ** 6):
        with pytest.raises(ValueError, match=rf"text ids \[{bad}\] name no token"):
            hf_text_tokenizer.HFTextTokenizer(tj, [4, bad])


def test_chameleon_pixel_scale_gives_its_processors_pixels():
    import jax.numpy as jnp
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    theirs = _chameleon_pixels(images, 16).transpose(0, 2, 3, 1)
    ours = np.asarray(vqgan.normalize_images(jnp.asarray(images), vqgan.CHAMELEON_PIXEL_SCALE))
    np.testing.assert_array_equal(ours, theirs)  # all 256 values, bit for bit
    assert hf_vq.config_from_hf(TINY_VQ).pixel_scale == 0.0078
    assert hf_vq.pixel_scale_from_hf(hf_vq.preprocessor_config(vqgan.VQGANConfig(image_size=16, channels=32))) == \
        vqgan.PIXEL_SCALE
    with pytest.raises(ValueError, match=r"x \* pixel_scale - 1 only"):
        hf_vq.pixel_scale_from_hf({"image_mean": [0.5, 0.5, 0.5]})


def test_exported_processor_resizes_as_our_ingestion(tmp_path):
    """The exported preprocessor_config.json resizes with our filter (bicubic), so transformers'
    processor gives the pixels ingestion encodes for images of other sizes too (Lanczos did not)."""
    from PIL import Image
    from data_pipeline import images as image_data
    cfg = vqgan.VQGANConfig(image_size=16, channels=32)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf_vq.preprocessor_config(cfg)))
    rs = np.random.RandomState(0)
    for w, h in ((20, 30), (64, 64), (32, 48)):   # sizes whose resize rounds the same in both
        image = np.asarray(Image.fromarray(rs.randint(0, 256, (h // 4, w // 4, 3)).astype(np.uint8)).resize((w, h)))
        theirs = _chameleon_pixels(image[None], 16, tmp_path)[0].transpose(1, 2, 0)
        ours = vqgan.pixel_table(cfg.pixel_scale)[image_data.center_crop_resize(image, 16)]
        np.testing.assert_array_equal(theirs, ours)


def _random_vqvae(vq, seed=0):
    import torch
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE
    torch.manual_seed(seed)
    model = ChameleonVQVAE(ChameleonVQVAEConfig(**vq)).eval()
    with torch.no_grad():  # GroupNorm affines away from (1, 0), so a swapped weight/bias would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    return model


@pytest.mark.parametrize("vq", [TINY_VQ, dict(TINY_VQ, attn_resolutions=[], channel_multiplier=[1, 1, 2],
                                                 resolution=32, num_res_blocks=2)])
def test_chameleon_vq_encoder_gives_transformers_codes(vq):
    import torch
    model = _random_vqvae(vq)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = hf_vq.config_from_hf(model.config.to_dict())
    assert not cfg.has_decoder and not cfg.l2_normalize_codes
    assert cfg.attention_levels == ((1,) if vq["attn_resolutions"] else ()) and cfg.mid_attention
    params = hf_vq.params_from_hf(state.get, state.keys(), cfg, prefix="")
    images = np.random.RandomState(0).uniform(-1, 1, (3, vq["resolution"], vq["resolution"], 3)).astype(np.float32)
    with torch.no_grad():
        out = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    codes = np.asarray(vqgan.encode(params, images, cfg))
    np.testing.assert_array_equal(codes, out.image_tokens.numpy().reshape(codes.shape))
    latents = vqgan.VQGAN(cfg).apply({"params": params}, images,
                                     method=lambda m, x: m.encoder(vqgan.normalize_images(x)))
    np.testing.assert_allclose(np.asarray(latents), out.last_hidden_state.numpy().transpose(0, 2, 3, 1),
                               atol=LATENT_ATOL, rtol=0)
    # and back to transformers' tensors bit for bit
    back = dict(hf_vq.hf_tensors(params, cfg, prefix=""))
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    with pytest.raises(vqgan.NoDecoderError, match="no decoder"):
        vqgan.decode(params, codes, cfg)


def test_chameleon_vq_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"channel_multiplier\[0\]=2"):
        hf_vq.config_from_hf(dict(TINY_VQ, channel_multiplier=[2, 2]))
    model = _random_vqvae(TINY_VQ)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = hf_vq.config_from_hf(dict(TINY_VQ, attn_resolutions=[]))  # config says no level attention
    with pytest.raises(ValueError, match=r"vq_config does not describe: \['encoder\.down\.1\.attn\.0"):
        hf_vq.params_from_hf(state.get, state.keys(), cfg, prefix="")
    cfg = hf_vq.config_from_hf(dict(TINY_VQ, num_embeddings=32))
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight has shape \(16, 4\)"):
        hf_vq.params_from_hf(state.get, state.keys(), cfg, prefix="")


def _chameleon_dir(tmp_path, tokenizer_json, vocab_size=320, max_length=96):
    hf_dir = tmp_path / "hf"
    os.makedirs(hf_dir)
    (hf_dir / "tokenizer.json").write_text(tokenizer_json)
    cfg = model_lib.TransformerConfig(vocab_size=vocab_size, num_layers=1, d_model=32, num_heads=4, d_ff=64,
                                      max_length=max_length, positions="rotary", norm="rmsnorm", mlp="swiglu",
                                      qk_norm=True)
    hf_cfg = dict(hf_interop.hf_config(cfg, "hf-chameleon", vocabulary_map=_hf_vocab(tokenizer_json)), vq_config=TINY_VQ)
    hf_interop.random_hf_model("hf-chameleon", hf_cfg, str(hf_dir), seed=3)
    return hf_dir


def test_imported_chameleon_workdir_has_a_vocab_and_vq_the_code_loads(tmp_path):
    import torch
    from cm3leon_jax import export, vocab as vocab_lib
    from cm3leon_jax.vq_tokenizer import VQTokenizer
    tj = helpers.chameleon_tokenizer_json()
    hf_dir = _chameleon_dir(tmp_path, tj)
    wd = tmp_path / "wd"
    summary = import_hf.import_hf(str(hf_dir), str(wd), remap_vocab=True)
    assert summary["vocab"] == "vocab" and summary["vq"] == "vq" and summary["not_carried"] == []
    vocab = vocab_lib.Vocabulary.load(wd / "vocab")
    vq, where = export.load_vq_tokenizer(str(wd))  # what Generator calls: the workdir's own vq/
    assert where == str(wd / "vq") and vq.tokens_per_image == vocab.image_tokens_per_image == 64
    assert VQTokenizer.from_workdir(str(wd / "vq")).codebook_size == vocab.num_image_codes == 16
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
    tokens = vocab.encode_document(["a red circle", vq.encode(image)])
    text, codes = vocab.decode_document(tokens)
    assert text == "a red circle"
    # the ids transformers' Chameleon gives the same image through its own image processor
    # (x * 0.0078 - 1, our imported pixel_scale), mapped into our layout (remapped weights)
    assert vq.config.pixel_scale == vqgan.CHAMELEON_PIXEL_SCALE
    hf = hf_interop.load_hf_model(str(hf_dir))
    pixels = torch.from_numpy(_chameleon_pixels(image[None], 16))
    with torch.no_grad():
        hf_image_ids = hf.model.get_image_tokens(pixels).numpy().reshape(-1)
    h2o = np.asarray(json.loads((wd / "hf_vocab_map.json").read_text())["hf_to_ours"])
    np.testing.assert_array_equal(h2o[hf_image_ids], vocab.image_codes_to_ids(codes.reshape(-1)))
    with pytest.raises(ValueError, match="no decoder"):
        vq.decode(codes)
    # without --remap_vocab the model keeps HF ids, so no vocab/ is written (and the summary says why)
    summary = import_hf.import_hf(str(hf_dir), str(tmp_path / "keep"))
    assert summary["vocab"] is None and "--remap_vocab" in summary["not_carried"][0]
    assert summary["vq"] == "vq"


def test_an_import_stopped_midway_is_not_taken_for_a_finished_one(tmp_path, monkeypatch):
    """config.json was written before vocab/ and vq/: an import killed in between looked finished and
    ran without its VQ. It comes last now, and a directory left without it is named as a stopped import."""
    from cm3leon_jax import vq_tokenizer
    hf_dir = _chameleon_dir(tmp_path, helpers.chameleon_tokenizer_json())
    wd = tmp_path / "wd"

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(vq_tokenizer, "save_vq_config", killed)   # the last step before config.json
    with pytest.raises(KeyboardInterrupt):
        import_hf.import_hf(str(hf_dir), str(wd), remap_vocab=True)
    assert (wd / "checkpoints").exists() and not (wd / "config.json").exists()
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="an import stopped before it finished"):
        import_hf.import_hf(str(hf_dir), str(wd), remap_vocab=True)
    import_hf.import_hf(str(hf_dir), str(tmp_path / "wd2"), remap_vocab=True)
    with pytest.raises(FileExistsError, match=r"already holds a workdir \(config.json\)"):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "wd2"), remap_vocab=True)


HUB_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, image_token_id=9)  # Chameleon's, as the tokenizer's


def _with_hub_ids(hf_dir):
    """The checkpoint's config.json with the hub's token ids (not our layout's <pad> 0, <eos> 1)."""
    cfg = dict(json.loads((hf_dir / "config.json").read_text()), **HUB_IDS)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_export_of_a_workdir_keeping_hf_ids_writes_the_checkpoints_ids(tmp_path):
    """Imported without --remap_vocab, the weights keep HF ids: its hf-chameleon export, and that of
    runs fine-tuned from it (init_from.json, two deep), gives transformers the source's ids and
    vocabulary_map (ours were written: generate stopped on the wrong token); a broken chain is an error."""
    import shutil
    from cm3leon_jax import export, trainer
    hf_dir = _chameleon_dir(tmp_path, helpers.chameleon_tokenizer_json())
    source = _with_hub_ids(hf_dir)
    keep = tmp_path / "keep"
    assert import_hf.import_hf(str(hf_dir), str(keep))["hf_ids"] == "hf_ids.json"

    def exported(workdir, name):
        export.export(str(workdir), str(tmp_path / name), "hf-chameleon")
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        return cfg, json.loads((tmp_path / name / "cm3leon_export.json").read_text())["token_ids"]

    cfg, note = exported(keep, "out")
    assert {k: cfg[k] for k in HUB_IDS} == HUB_IDS and cfg["vocabulary_map"] == source["vocabulary_map"]
    assert note["layout"] == "hf" and note["hf_config"] == str(hf_dir / "config.json") and note["eos_token_id"] == 2
    assert hf_interop.load_hf_model(str(tmp_path / "out")).generation_config.eos_token_id == 2
    # fine-tuned runs (what trainer.init_from_pretrained leaves: config, checkpoints, init_from.json)
    previous = keep
    for name in ("sft", "lora"):
        shutil.copytree(keep, tmp_path / name, ignore=shutil.ignore_patterns("hf_ids.json"))
        (tmp_path / name / trainer.INIT_FROM_FILE).write_text(json.dumps({"workdir": str(previous), "step": 0}))
        previous = tmp_path / name
    cfg, note = exported(tmp_path / "lora", "out_lora")
    assert {k: cfg[k] for k in HUB_IDS} == HUB_IDS and cfg["vocabulary_map"] == source["vocabulary_map"]
    assert note["chain"] == [str(tmp_path / n) for n in ("lora", "sft", "keep")]
    shutil.rmtree(tmp_path / "sft")
    with pytest.raises(FileNotFoundError, match=r"started from .*sft, which is gone.*hf_ids\.json"):
        export.export(str(tmp_path / "lora"), str(tmp_path / "out_broken"), "hf-chameleon")
    assert not os.path.exists(tmp_path / "out_broken")
    # weights in our layout (--remap_vocab): our ids and vocab/'s map, as before
    import_hf.import_hf(str(hf_dir), str(tmp_path / "remap"), remap_vocab=True)
    assert not os.path.exists(tmp_path / "remap" / "hf_ids.json")
    cfg, note = exported(tmp_path / "remap", "out_remap")
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"], note["layout"]) == (0, 1, 1, "ours")
    assert "image_token_id" not in cfg and hf_interop.vocab_mapping(cfg["vocabulary_map"], 320)["ours_to_hf"] == \
        list(range(320))   # our_vocabulary_map: our layout
    # a run in our layout (its own vocab/) whose base is gone still exports, with our ids
    shutil.copytree(tmp_path / "remap", tmp_path / "tuned")
    (tmp_path / "tuned" / trainer.INIT_FROM_FILE).write_text(json.dumps({"workdir": str(tmp_path / "gone"), "step": 0}))
    cfg, note = exported(tmp_path / "tuned", "out_tuned")
    assert (cfg["eos_token_id"], note["layout"], note["chain"]) == (1, "ours", [str(tmp_path / "tuned")])


def test_import_refuses_a_tokenizer_that_is_not_the_checkpoints(tmp_path):
    hf_dir = _chameleon_dir(tmp_path, helpers.chameleon_tokenizer_json())
    # two pieces' ids swapped: not the ids the model was trained on
    other = json.loads(helpers.chameleon_tokenizer_json())
    v = other["model"]["vocab"]
    v["a"], v["b"] = v["b"], v["a"]
    (hf_dir / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"tokenizer\.json is not the tokenizer of this checkpoint"):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "a"), remap_vocab=True)
    big = json.loads(helpers.chameleon_tokenizer_json(num_codes=48))  # ids beyond the model's vocab_size
    (tmp_path / "big.json").write_text(json.dumps(big))
    with pytest.raises(ValueError, match="outside the model's vocab_size 320"):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "b"), vocab_file=str(tmp_path / "big.json"), remap_vocab=True)
    (hf_dir / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "c"), remap_vocab=True)


def _vq_workdir(path, **fields):
    """A train_vq-style workdir (vq_config.json + checkpoints/0) of a random tiny VQGAN."""
    import jax
    from cm3leon_jax import export, vq_tokenizer
    cfg = vqgan.VQGANConfig(**dict(dict(image_size=16, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                                        codebook_size=16, code_dim=4, embed_dim=8), **fields))
    os.makedirs(path)
    export.save_params_checkpoint(str(path), 0, vqgan.init_params(jax.random.key(1), cfg))
    vq_tokenizer.save_vq_config(str(path), cfg)
    return str(path)


def test_hf_chameleon_export_writes_our_vq_encoder(tmp_path):
    import torch
    from cm3leon_jax import export
    from cm3leon_jax.vq_tokenizer import VQTokenizer
    from tests.test_interop import CHAMELEON, _workdir
    _workdir(tmp_path / "wd", **CHAMELEON)
    vq_dir = _vq_workdir(tmp_path / "vq")  # ours: l2-normalised 4-d codes, attention at the lowest level
    export.export(str(tmp_path / "wd"), str(tmp_path / "hf"), "hf-chameleon", vq_workdir=vq_dir)
    note = json.loads((tmp_path / "hf" / "cm3leon_export.json").read_text())["vqmodel"]
    assert note["written"] and "no decoder" in note["what"] and "l2-normalised" in note["what"]
    hf = hf_interop.load_hf_model(str(tmp_path / "hf"))
    ours = VQTokenizer.from_workdir(vq_dir)
    images = np.random.RandomState(2).randint(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    # the exported preprocessor_config.json makes transformers' processor feed our pixels
    pixels = torch.from_numpy(_chameleon_pixels(images, 16, tmp_path / "hf"))
    np.testing.assert_array_equal(pixels.numpy(), images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        theirs = hf.model.vqmodel.encode(pixels).image_tokens.numpy().reshape(4, 8, 8)
    np.testing.assert_array_equal(theirs, ours.encode(images))
    # and the import reads the same codes back (Euclidean lookup on the normalised codebook)
    import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    np.testing.assert_array_equal(VQTokenizer.from_workdir(str(tmp_path / "back" / "vq")).encode(images), theirs)
    # one Chameleon cannot hold: refused when named, before anything is written
    narrow = _vq_workdir(tmp_path / "vq16", channels=16)
    with pytest.raises(ValueError, match="cannot be written as Chameleon's ChameleonVQVAE: GroupNorm groups"):
        export.export(str(tmp_path / "wd"), str(tmp_path / "hf2"), "hf-chameleon", vq_workdir=narrow)
    assert not os.path.exists(tmp_path / "hf2")


def test_a_local_encoder_vq_is_not_written_as_chameleons():
    """Chameleon's encoder convolves the whole image; a local_encoder VQ encodes each token's patch
    alone, so transformers would compute other codes from the same weights (13% equal, measured)."""
    cfg = vqgan.VQGANConfig(image_size=16, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                            codebook_size=16, code_dim=4, embed_dim=8, local_encoder=True)
    with pytest.raises(ValueError, match="local_encoder=True"):
        hf_vq.hf_config(cfg)
