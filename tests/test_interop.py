"""Export (params bundles, transformers OPT/Chameleon) and import of HF checkpoints.

Logit comparisons with transformers are float32 on unpadded rows, tolerance 1e-4 absolute
(measured: under 1e-6 on logits of magnitude ~2). Round trips through the HF formats and the
params bundle are bit-exact. Tests that need torch/transformers skip when they are missing (the
CI installs them with the `interop` extra).
"""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cm3leon_jax import checkpointing, export, hf_interop, import_hf, model as model_lib
from tests.helpers import REPO, cli_env, run_cli, tiny_config

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None or
                              importlib.util.find_spec("torch") is None,
                              reason="needs the interop extra (torch, transformers)")
ATOL = 1e-4
CHAMELEON = {"model.positions": "rotary", "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.qk_norm": True,
             "model.qk_norm_params": True, "z_loss_weight": 1e-5}
TOKENS = np.random.RandomState(0).randint(0, 64, (2, 12))


def _workdir(path, step=3, seed=1, **overrides):
    """A workdir holding a tiny model with random (non-zero everywhere) params at `step`."""
    config = tiny_config(**overrides)
    cfg = model_lib.TransformerConfig.from_config(config.model)
    model = model_lib.Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for (p, x), k in zip(leaves, keys):
        noise = 0.1 * jax.random.normal(k, x.shape)
        new.append(1.0 + noise if jax.tree_util.keystr(p).endswith("['scale']") else noise)
    params = jax.tree_util.tree_unflatten(treedef, new)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    export.save_params_checkpoint(str(path), step, params)
    return cfg, model, jax.device_get(params)


def _restore(workdir):
    config = export.read_config(workdir)
    cfg, abstract = export.abstract_params(config)
    params, _ = checkpointing.restore_params(str(workdir), abstract)
    return cfg, jax.device_get(params)


def _logits(cfg, params, tokens=TOKENS):
    return np.asarray(model_lib.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens)))


def _assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [jax.tree_util.keystr(p) for p, _ in fa] == [jax.tree_util.keystr(p) for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(p)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


@needs_hf
@pytest.mark.parametrize("fmt,overrides", [
    ("hf-opt", {}),
    ("hf-opt", {"model.mlp": "gelu", "model.tie_embeddings": True}),
    ("hf-chameleon", CHAMELEON),
    ("hf-chameleon", dict(CHAMELEON, **{"model.norm_placement": "swin", "model.qk_norm_params": False})),
])
def test_export_to_transformers_matches_and_round_trips(tmp_path, fmt, overrides):
    cfg, _, params = _workdir(tmp_path / "wd", **overrides)
    out = str(tmp_path / "hf")
    export.export(str(tmp_path / "wd"), out, fmt)
    hf_model = hf_interop.load_hf_model(out)
    ours, theirs = _logits(cfg, params), hf_interop.hf_logits(hf_model, TOKENS)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
    # ... and back: the same params bit for bit (Chameleon without qk_norm_params comes back with them at 1/0)
    back = tmp_path / "back"
    import_hf.import_hf(out, str(back))
    cfg2, params2 = _restore(back)
    expected_model = dict(export.read_config(tmp_path / "wd").model)
    if fmt == "hf-chameleon":
        expected_model["qk_norm_params"] = True  # imported Chameleons always carry the QK-norm weights
    assert dict(export.read_config(back).model) == expected_model
    if cfg.qk_norm_params or fmt == "hf-opt":
        _assert_trees_equal(params, params2)
    else:
        np.testing.assert_allclose(_logits(cfg2, params2), ours, atol=1e-6, rtol=0)


@needs_hf
@pytest.mark.parametrize("fmt", ["hf-opt", "hf-chameleon"])
def test_import_random_transformers_model(tmp_path, fmt):
    if fmt == "hf-opt":
        cfg = model_lib.TransformerConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=32)
    else:
        cfg = model_lib.TransformerConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=32,
                                          positions="rotary", rotary_base=500.0, norm="rmsnorm", mlp="swiglu",
                                          qk_norm=True, qk_norm_params=True)
    hf_dir = str(tmp_path / "hf")
    hf_interop.random_hf_model(fmt, hf_interop.hf_config(cfg, fmt), hf_dir, seed=3)
    hf_model = hf_interop.load_hf_model(hf_dir)
    theirs = hf_interop.hf_logits(hf_model, TOKENS)
    # stream into a mesh that splits every axis (data 2, fsdp 2, tensor 2)
    summary = import_hf.import_hf(hf_dir, str(tmp_path / "wd"), mesh_config=dict(data=2, fsdp=2, tensor=2))
    assert summary["format"] == fmt
    cfg2, params = _restore(tmp_path / "wd")
    assert cfg2.positions == cfg.positions and cfg2.rotary_base == cfg.rotary_base
    np.testing.assert_allclose(_logits(cfg2, params), theirs, atol=ATOL, rtol=0)
    config = export.read_config(tmp_path / "wd")
    if fmt == "hf-chameleon":
        assert config.z_loss_weight == 1e-5 and config.model.qk_norm_params


def test_import_opt_folder_with_its_tokenizer_vocab(tmp_path):
    """A hub OPT folder holds vocab.json (no <break>, no reserved tokens): the import keeps HF ids and
    says why no hf_vocab_map.json was written; only an explicit --remap_vocab needs the mapping."""
    _workdir(tmp_path / "ours", **{"model.num_layers": 1})
    hf_dir = tmp_path / "hf"
    export.export(str(tmp_path / "ours"), str(hf_dir), "hf-opt")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 60)}}
    (hf_dir / "vocab.json").write_text(json.dumps(vocab))
    summary = import_hf.import_hf(str(hf_dir), str(tmp_path / "wd"))
    assert summary["vocab_mapping"] is None and any("hf_vocab_map.json" in n and "<break>" in n
                                                    for n in summary["not_carried"])
    assert not os.path.exists(tmp_path / "wd" / import_hf.VOCAB_MAP_JSON)
    with pytest.raises(ValueError, match="no token for <break>"):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "wd2"), remap_vocab=True)


def test_params_bundle(tmp_path):
    wd = tmp_path / "wd"
    cfg, _, params = _workdir(wd, step=5, **CHAMELEON)
    out = tmp_path / "bundle"
    manifest = export.export(str(wd), str(out), "params")
    assert manifest["step"] == 5 and "model.safetensors" in manifest["files"]
    config, loaded = export.load_bundle(str(out))
    assert dict(config.model) == dict(export.read_config(wd).model)
    _assert_trees_equal(params, loaded)
    _, restored = _restore(out)  # the bundle is also a workdir for restore_params
    _assert_trees_equal(params, restored)
    _, abstract = export.abstract_params(config)
    _, sharded = export.load_bundle(str(out), abstract=abstract)
    _assert_trees_equal(params, jax.device_get(sharded))
    np.testing.assert_array_equal(_logits(cfg, loaded), _logits(cfg, params))


def test_bundle_corruption_and_mismatch_are_clear(tmp_path):
    wd, out = tmp_path / "wd", tmp_path / "bundle"
    _workdir(wd)
    export.export(str(wd), str(out), "params")
    st = out / "model.safetensors"
    original = st.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*sha256"):
        export.load_bundle(str(out))
    st.write_bytes(original[:-8])
    with pytest.raises(ValueError, match=r"model\.safetensors.*bytes"):
        export.load_bundle(str(out))
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        hf_interop.SafetensorsFile(str(st))
    st.write_bytes(original)
    # a config whose model differs from the tensors (manifest updated so only the shapes disagree)
    config = json.loads((out / "config.json").read_text())
    config["model"]["d_ff"] = 96
    (out / "config.json").write_text(json.dumps(config))
    manifest = json.loads((out / "bundle.json").read_text())
    manifest["files"]["config.json"] = {"bytes": (out / "config.json").stat().st_size,
                                        "sha256": export._sha256(str(out / "config.json"))}
    (out / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"tensor layers/layer/mlp/up/kernel has shape \(2, 32, 64\).*\(2, 32, 96\)"):
        export.load_bundle(str(out))


def test_a_bundle_read_into_parameters_of_other_shapes_names_them(tmp_path):
    """Shards were sliced from the file by the abstract's index: a vocab_size 48 model sharded over
    the vocab axis got the bundle's first 48 rows of 64, silently."""
    import ml_collections
    from cm3leon_jax import sharding
    _workdir(tmp_path / "wd")
    export.export(str(tmp_path / "wd"), str(tmp_path / "bundle"), "params")
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
    _, abstract = export.abstract_params(tiny_config(**{"model.vocab_size": 48}), mesh)
    assert "tensor" in abstract["token_embedding"].sharding.spec   # the vocab axis is split
    with pytest.raises(ValueError, match=r"tensor token_embedding has shape \(64, 32\), the parameters asked for need \(48, 32\)"):
        export.load_bundle(str(tmp_path / "bundle"), abstract=abstract)
    with pytest.raises(ValueError, match=r"output_head/kernel has shape \(32, 64\)"):
        export.restore_params(str(tmp_path / "bundle"), abstract)


def test_restore_params_refuses_a_checkpoint_of_other_parameters(tmp_path):
    """orbax's partial restore handed back the requested ShapeDtypeStructs for parameters the
    checkpoint lacks, and dropped the ones it has beyond the model (a tied head restored from an
    untied run), both silently."""
    _workdir(tmp_path / "wd")
    for overrides, match in [({"model.qk_norm": True, "model.qk_norm_params": True},
                              r"step 3 .* missing \['layers/layer/attention/key_norm/bias'"),
                             ({"model.tie_embeddings": True}, r"not in the model \['output_head/kernel'\]")]:
        _, abstract = export.abstract_params(tiny_config(**overrides))
        with pytest.raises(ValueError, match=match):
            checkpointing.restore_params(str(tmp_path / "wd"), abstract)


def test_restore_params_names_parameters_of_other_shapes(tmp_path):
    """Same names, other shapes (another vocab_size or d_ff): orbax raised a ValueError that named no
    parameter and advised padding/truncating it."""
    _workdir(tmp_path / "wd")
    for overrides, match in [({"model.vocab_size": 80}, r"other shapes .* token_embedding \(64, 32\) \(the model: \(80, 32\)\)"),
                             ({"model.d_ff": 96}, r"layers/layer/mlp/up/kernel \(2, 32, 64\) \(the model: \(2, 32, 96\)\)")]:
        _, abstract = export.abstract_params(tiny_config(**overrides))
        with pytest.raises(ValueError, match=match):
            checkpointing.restore_params(str(tmp_path / "wd"), abstract)


def test_float16_export_refuses_values_beyond_its_range(tmp_path):
    """numpy casts 1e5 to float16 inf with a warning only: the exported model would carry it."""
    _, _, params = _workdir(tmp_path / "src")
    params = jax.tree.map(np.array, params)
    params["position_embedding"][3, 5] = -1e5
    wd = tmp_path / "wd"
    os.makedirs(wd)
    (wd / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    export.save_params_checkpoint(str(wd), 3, params)
    with pytest.raises(ValueError, match=r"embed_positions.*1 value\(s\).*100000.*overflow float16.*65504"):
        export.export(str(wd), str(tmp_path / "fp16"), "hf-opt", dtype="float16")
    assert os.listdir(tmp_path / "fp16") == []   # no half-written model.safetensors.tmp left
    export.export(str(wd), str(tmp_path / "fp16"), "hf-opt", dtype="bfloat16")   # the same dir, now written
    st = hf_interop.SafetensorsFile(str(tmp_path / "fp16" / "model.safetensors"))
    assert all(np.isfinite(np.asarray(st.get(k), np.float32)).all() for k in st.keys())


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    wd = tmp_path / "wd"
    os.makedirs(wd)
    (wd / "config.json").write_text(tiny_config(**{"model.positions": "rotary", "model.qk_norm": True})
                                    .to_json_best_effort())
    with pytest.raises(ValueError, match=r"hf-opt.*positions='rotary'.*qk_norm=True"):
        export.export(str(wd), str(tmp_path / "out"), "hf-opt")
    (wd / "config.json").write_text(tiny_config().to_json_best_effort())
    with pytest.raises(ValueError, match=r"hf-chameleon.*positions='learned'.*norm='layernorm'.*mlp='relu'"):
        export.export(str(wd), str(tmp_path / "out"), "hf-chameleon")
    assert not os.path.exists(tmp_path / "out")  # refused before writing anything
    (tmp_path / "out").write_text("")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        export.export(str(wd), str(tmp_path / "out"), "params")


@needs_hf
def test_import_refuses_what_our_model_cannot_hold(tmp_path):
    from safetensors.numpy import load_file, save_file
    cfg = model_lib.TransformerConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=32)
    hf_dir = tmp_path / "hf"
    hf_interop.random_hf_model("hf-opt", hf_interop.hf_config(cfg, "hf-opt"), str(hf_dir))
    st = str(hf_dir / "model.safetensors")
    tensors = load_file(st)
    tensors["model.decoder.layers.1.fc1.bias"] = tensors["model.decoder.layers.1.fc1.bias"] + 0.5
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.decoder\.layers\.1\.fc1\.bias is not all 0"):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "a"))
    # a config that disagrees with the tensors' shapes
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    hf_cfg["ffn_dim"] = 96
    (hf_dir / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match=r"fc1\.weight in .*model\.safetensors has shape \(64, 32\), expected \(96, 32\)"):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "b"))
    hf_cfg.update(ffn_dim=64, do_layer_norm_before=False)
    (hf_dir / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "c"))
    (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupted safetensors header"):
        hf_interop.HFCheckpoint(str(hf_dir))


def _synthetic_chameleon_vocab():
    """A Chameleon-style vocabulary: specials, reserved slots, BPE text and image codes inside it."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<reserved00003>": 3, "<racm3:break>": 4, "<eoss>": 5,
             "<reserved00006>": 6, "<sentinel:0>": 7, "<sentinel:1>": 8, "<image>": 9}
    for i, piece in enumerate(["a", "b", "ab", "Ġthe", "Ġred", "Ġcircle"]):
        vocab[piece] = 10 + i
    for code in range(8):  # image codes at 16..23, listed in a scrambled order
        vocab[hf_interop.image_token_name((code * 3) % 8)] = 16 + code
    vocab["more"] = 24
    return vocab  # ids 25..31 unnamed (padding rows)


def test_vocab_mapping_on_a_chameleon_style_vocab(tmp_path):
    assert hf_interop.image_token_name(4021) == "IMGIMGEACBZ" and hf_interop.image_token_code("IMGIMGEACBZ") == 4021
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(_synthetic_chameleon_vocab()))
    m = hf_interop.vocab_mapping(hf_interop.read_hf_vocab(str(path)), vocab_size=32)
    lay = m["layout"]
    assert lay == dict(num_specials=7, num_sentinels=2, text_offset=7, text_size=10, image_offset=17, num_image_codes=8,
                       size=25, vocab_size=32)
    o2h = m["ours_to_hf"]
    assert o2h[:7] == [1, 2, 4, 5, 3, 7, 8]  # <pad> </s> <racm3:break> <eoss> <mask>=reserved, sentinels
    assert m["special_sources"]["<mask>"] == "<reserved00003>"
    assert o2h[7:17] == [0, 6, 9, 10, 11, 12, 13, 14, 15, 24]  # text: every other named id, in HF order
    inv = {v: k for k, v in _synthetic_chameleon_vocab().items()}
    assert [hf_interop.image_token_code(inv[h]) for h in o2h[17:25]] == list(range(8))
    assert o2h[25:] == list(range(25, 32))
    assert sorted(m["hf_to_ours"]) == list(range(32))
    assert all(m["hf_to_ours"][h] == o for o, h in enumerate(o2h))
    # tokenizer.json form (model vocab + added tokens) reads the same
    tok = {"model": {"vocab": {k: v for k, v in _synthetic_chameleon_vocab().items() if v >= 10}},
           "added_tokens": [{"id": v, "content": k} for k, v in _synthetic_chameleon_vocab().items() if v < 10]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert hf_interop.read_hf_vocab(str(tmp_path / "tokenizer.json")) == _synthetic_chameleon_vocab()
    with pytest.raises(ValueError, match="not contiguous"):
        hf_interop.vocab_mapping({"IMGIMGBZ": 0, "<pad>": 1}, vocab_size=4)


def test_our_vocabulary_map_maps_back_to_our_layout(tiny_spm_model):
    from cm3leon_jax import text_tokenizer, vocab as vocab_lib
    vocab = vocab_lib.Vocabulary(text_tokenizer.TextTokenizer(tiny_spm_model), num_image_codes=16,
                                 image_tokens_per_image=4, num_sentinels=3)
    size = vocab.padded_size(64)
    vmap = hf_interop.our_vocabulary_map(vocab, size)
    assert sorted(vmap.values()) == list(range(vocab.size))  # padding rows unnamed
    m = hf_interop.vocab_mapping(vmap, size)
    assert m["ours_to_hf"] == list(range(size))
    assert {k: m["layout"][k] for k in ("text_offset", "image_offset", "num_image_codes", "num_sentinels")} == \
        dict(text_offset=vocab.text_offset, image_offset=vocab.image_offset, num_image_codes=16, num_sentinels=3)


def test_import_of_our_export_carries_its_vocabulary(tmp_path, tiny_spm_model):
    """hf-opt export -> import_hf -> generate: the export keeps our ids and writes cm3leon_vocab/;
    the import used to drop it (no tokenizer.json), leaving OUT without vocab/."""
    from cm3leon_jax import text_tokenizer, vocab as vocab_lib
    vocab = vocab_lib.Vocabulary(text_tokenizer.TextTokenizer(tiny_spm_model), num_image_codes=16,
                                 image_tokens_per_image=4, num_sentinels=3)
    _workdir(tmp_path / "wd", **{"model.vocab_size": vocab.padded_size(64)})
    vocab.save(str(tmp_path / "wd" / "vocab"))
    export.export(str(tmp_path / "wd"), str(tmp_path / "hf"), "hf-opt")
    summary = import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert summary["vocab"] == "vocab" and not any(n.startswith("vocab/") for n in summary["not_carried"])
    assert vocab_lib.Vocabulary.load(str(tmp_path / "back" / "vocab")).fingerprint == vocab.fingerprint


@needs_hf
def test_import_chameleon_with_vocab_remap(tmp_path):
    cfg = model_lib.TransformerConfig(vocab_size=32, num_layers=1, d_model=32, num_heads=4, d_ff=64, max_length=32,
                                      positions="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=True)
    hf_vocab = _synthetic_chameleon_vocab()
    hf_dir = str(tmp_path / "hf")
    hf_interop.random_hf_model("hf-chameleon", hf_interop.hf_config(cfg, "hf-chameleon", vocabulary_map=hf_vocab),
                               hf_dir, seed=5)
    tokens = np.random.RandomState(1).randint(0, 32, (2, 10))
    theirs = hf_interop.hf_logits(hf_interop.load_hf_model(hf_dir), tokens)
    import_hf.import_hf(hf_dir, str(tmp_path / "keep"))  # mapping from the config's vocabulary_map, ids kept
    mapping = json.loads((tmp_path / "keep" / "hf_vocab_map.json").read_text())
    assert not mapping["weights_remapped"] and mapping["layout"]["image_offset"] == 17
    cfg_k, params_k = _restore(tmp_path / "keep")
    text = [i for i in range(32) if i not in set(range(16, 24))]  # transformers masks image-token logits
    np.testing.assert_allclose(_logits(cfg_k, params_k, tokens)[..., text], theirs[..., text], atol=ATOL, rtol=0)
    import_hf.import_hf(hf_dir, str(tmp_path / "remap"), remap_vocab=True)
    cfg_r, params_r = _restore(tmp_path / "remap")
    h2o, o2h = np.asarray(mapping["hf_to_ours"]), np.asarray(mapping["ours_to_hf"])
    ours = _logits(cfg_r, params_r, h2o[tokens])  # same text in our ids, logits in our id order
    np.testing.assert_allclose(ours[..., h2o[text]], theirs[..., text], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(params_r["token_embedding"]), np.asarray(params_k["token_embedding"])[o2h])


def test_cli_and_no_torch_in_core(tmp_path):
    """The CLI runs; importing the package (export/import included) imports neither torch nor
    transformers and defines no absl flags."""
    wd = tmp_path / "wd"
    _workdir(wd)
    code = ("import sys, absl.flags\n"
            "import cm3leon_jax.export, cm3leon_jax.import_hf, cm3leon_jax.hf_interop, cm3leon_jax.trainer\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
            "assert 'workdir' not in absl.flags.FLAGS and 'hf_dir' not in absl.flags.FLAGS, 'flags defined'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=cli_env(1))
    run_cli("cm3leon_jax.export", "--workdir", wd, "--format", "hf-opt", "--out", tmp_path / "hf", "--dtype", "bfloat16")
    st = hf_interop.SafetensorsFile(str(tmp_path / "hf" / "model.safetensors"))
    assert str(st.dtype("lm_head.weight")) == "bfloat16"
    # one --mesh_* flag: the others take the usage line's defaults (fsdp fills the remaining devices)
    out = run_cli("cm3leon_jax.import_hf", "--hf_dir", tmp_path / "hf", "--workdir", tmp_path / "back",
                  "--mesh_tensor", 2, num_devices=8)
    assert json.loads(out.stdout.strip().splitlines()[-1])["format"] == "hf-opt"
    assert (tmp_path / "back" / "checkpoints" / "0").is_dir()
    assert import_hf.cli_mesh(None, None, None) is None
    assert import_hf.cli_mesh(-1, None, None) == dict(data=-1, fsdp=1, tensor=1)


# ----------------------------------------------------------------------------- bundles of the pipeline's LM


@pytest.fixture(scope="module")
def pipeline_bundle(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline's LM exported by the CLI to a params bundle in a directory of its own."""
    out = str(tmp_path_factory.mktemp("bundle") / "lm_bundle")
    run_cli("cm3leon_jax.export", "--workdir", tiny_pipeline["lm"], "--step", "4", "--format", "params", "--out", out)
    return out


def test_params_bundle_generates_the_same_samples_as_its_workdir(tiny_pipeline, pipeline_bundle):
    from cm3leon_jax import generate, sampling
    manifest = json.loads(open(os.path.join(pipeline_bundle, "bundle.json")).read())
    assert manifest["step"] == 4 and manifest["vq"]["source_workdir"] == os.path.abspath(tiny_pipeline["vq"])
    assert {"vq/model.safetensors", "vq/vq_config.json", "vocab/vocab.json", "vocab/spm.model"} <= set(manifest["files"])
    from_workdir = generate.Generator(tiny_pipeline["lm"])
    # data_dir="": nothing from the data dir (no ingest report -> VQ workdir, no retriever); all from the bundle
    from_bundle = generate.Generator(pipeline_bundle, data_dir="")
    assert from_bundle.step == from_workdir.step == 4 and from_bundle.retriever is None
    config = sampling.SamplingConfig(top_p=0.9, cfg_scale=3.0)
    captions = ["a small red circle at the top left", "a large blue square"]
    a, b = (g.text_to_image(captions, num_samples=4, config=config, cd_fraction=0.5, rerank=False, seed=3)
            for g in (from_workdir, from_bundle))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.codes, y.codes)
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
    images = np.concatenate([a[0].images[:1], a[1].images[:1]])
    assert from_bundle.vq.encode(images).tolist() == from_workdir.vq.encode(images).tolist()
    assert from_bundle.image_to_text(images, max_tokens=8, seed=2) == \
        from_workdir.image_to_text(images, max_tokens=8, seed=2)
    with pytest.raises(ValueError, match="needs a retriever.*params bundle carries none"):
        from_bundle.text_to_image(captions[:1], num_samples=1, num_neighbours=1)
    with pytest.raises(ValueError, match="params bundle of step 4, not 2"):
        export.restore_params(pipeline_bundle, None, step=2)


def test_corrupted_or_mismatched_bundle_file_names_it(pipeline_bundle, tmp_path):
    import dataclasses
    import shutil
    from cm3leon_jax import vq_tokenizer
    out = tmp_path / "bundle"
    shutil.copytree(pipeline_bundle, out)
    assert export.load_bundle_vq(str(out)).codebook_size == 32
    vq_st = out / "vq" / "model.safetensors"
    original = vq_st.read_bytes()
    data = bytearray(original)
    data[-5] ^= 0x01  # one flipped bit in the VQ decoder's last tensor
    vq_st.write_bytes(bytes(data))
    for load in (export.load_bundle_vq, export.load_bundle):
        with pytest.raises(ValueError, match=r"vq/model\.safetensors: sha256 does not match bundle\.json"):
            load(str(out))
    vq_st.write_bytes(original)
    spm = out / "vocab" / "spm.model"
    spm.rename(tmp_path / "spm.model")
    with pytest.raises(ValueError, match=r"vocab/spm\.model: listed in bundle\.json but missing"):
        export.load_bundle(str(out))
    (tmp_path / "spm.model").rename(spm)
    # a VQ config that does not describe the tensors (manifest updated so only the shapes disagree)
    vq_config = vq_tokenizer.load_vq_config(str(out / "vq"))
    vq_tokenizer.save_vq_config(str(out / "vq"), dataclasses.replace(vq_config, code_dim=6))
    manifest = json.loads((out / "bundle.json").read_text())
    manifest["files"]["vq/vq_config.json"] = {"bytes": (out / "vq" / "vq_config.json").stat().st_size,
                                              "sha256": export._sha256(str(out / "vq" / "vq_config.json"))}
    (out / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"vq/model\.safetensors does not match .*vq/vq_config\.json: tensor .* has "
                                         r"shape"):
        export.load_bundle_vq(str(out))


@needs_hf
def test_import_chameleon_with_a_real_tokenizer_structure(tmp_path):
    """A byte-level BPE tokenizer.json saved by transformers with Chameleon's special tokens and
    IMGIMG image tokens inside the BPE vocabulary, and a config whose vocabulary_map is that
    vocabulary (as transformers' Chameleon conversion writes it): our mapping agrees with
    transformers' own ChameleonImageVocabularyMapping and with the tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping
    from tests import helpers
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(helpers.chameleon_tokenizer_json(16)),
                                        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    hf_dir = tmp_path / "hf"
    tokenizer.save_pretrained(str(hf_dir))
    vocabulary_map = tokenizer.get_vocab()
    assert hf_interop.read_hf_vocab(str(hf_dir / "tokenizer.json")) == vocabulary_map
    cfg = model_lib.TransformerConfig(vocab_size=320, num_layers=1, d_model=32, num_heads=4, d_ff=64, max_length=32,
                                      positions="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=True)
    tiny_vq = dict(resolution=16, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, embed_dim=4,
                   num_embeddings=16, latent_channels=8)  # 16 codes, as the vocabulary's image tokens
    hf_interop.random_hf_model("hf-chameleon", dict(hf_interop.hf_config(cfg, "hf-chameleon", vocabulary_map=vocabulary_map),
                                                    vq_config=tiny_vq), str(hf_dir), seed=2)
    summary = import_hf.import_hf(str(hf_dir), str(tmp_path / "wd"), remap_vocab=True)
    assert summary["vocab_mapping"]["num_image_codes"] == 16 and summary["not_carried"] == []
    assert (summary["vocab"], summary["vq"]) == ("vocab", "vq")  # tests/test_hf_tokenizers.py uses them
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "wd" / "hf_tokenizer"))
    m = json.loads((tmp_path / "wd" / "hf_vocab_map.json").read_text())
    lay, o2h, h2o = m["layout"], m["ours_to_hf"], m["hf_to_ours"]
    theirs = ChameleonImageVocabularyMapping(vocabulary_map)
    assert [o2h[lay["image_offset"] + c] for c in range(16)] == [theirs.img2bpe[c] for c in range(16)]
    assert m["special_sources"] == {"<pad>": "<pad>", "<eos>": "</s>", "<break>": "<racm3:break>", "<eoss>": "<eoss>",
                                    "<mask>": "<reserved08706>", "<mask:0>": "<sentinel:0>", "<mask:1>": "<sentinel:1>"}
    ids = tokenizer("a small red circle at the top left").input_ids
    ours = [h2o[i] for i in ids]
    assert all(lay["text_offset"] <= i < lay["image_offset"] for i in ours)
    assert tokenizer.decode([o2h[i] for i in ours]) == "a small red circle at the top left"
    assert [h2o[vocabulary_map[t]] for t in ("<pad>", "</s>", "<racm3:break>", "<eoss>")] == [0, 1, 2, 3]
