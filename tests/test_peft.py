"""LoRA adapters to and from Hugging Face PEFT: a LoRA run's adapters alone, loaded by PEFT on the
hf-* export of the model it fine-tuned, give our merged model's logits; adapters made by PEFT
itself import as a LoRA run of ours with PEFT's logits; what our adapters cannot hold is refused.

Float32 logits on unpadded rows, tolerance 1e-4 absolute as in test_interop. Needs the interop
extra (torch, transformers, peft); skipped without it.
"""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from cm3leon_jax import export, hf_interop, import_hf, lora, model as model_lib, sharding, trainer
from tests.helpers import run_cli, tiny_config

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "peft")),
                                reason="needs the interop extra (torch, transformers, peft)")
ATOL = 1e-4
TOKENS = np.random.RandomState(0).randint(0, 64, (2, 12))
CHAMELEON = {"model.positions": "rotary", "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.qk_norm": True,
             "model.qk_norm_params": True}


def _peft_logits(base_dir: str, adapter_dir: str | None) -> np.ndarray:
    model = hf_interop.load_hf_model(base_dir)
    if adapter_dir is not None:
        import peft
        model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    return hf_interop.hf_logits(model, TOKENS)


def _our_logits(workdir: str) -> np.ndarray:
    """Logits of a workdir's model as generation sees it (a LoRA run's adapters merged)."""
    _, cfg, params, _ = export.load_workdir_params(workdir)
    return np.asarray(model_lib.Transformer(cfg).apply({"params": params}, TOKENS))


def _lora_run(tmp_path, arch: dict, targets: str):
    """A pretrained run and a LoRA run fine-tuned from it by the trainer (adapters off zero)."""
    base = str(tmp_path / "base")
    trainer.train(tiny_config(**dict(arch, total_steps=2)), base)
    config = tiny_config(**dict(arch, **{"total_steps": 4, "model.lora_rank": 4, "model.lora_alpha": 8.0,
                                         "model.lora_targets": targets, "optimizer.peak_lr": 5e-2}))
    config.init_from = base
    run = str(tmp_path / "lora")
    trainer.train(config, run)
    return base, run


@pytest.mark.parametrize("fmt,arch,targets", [
    ("hf-chameleon", CHAMELEON, ",".join(lora.TARGETS)),
    ("hf-opt", {"model.scan_layers": False}, "query,value,out,down"),
])
def test_a_lora_runs_adapters_run_in_peft_and_import_back_exactly(tmp_path, fmt, arch, targets):
    base, run = _lora_run(tmp_path, arch, targets)
    base_hf, adapter = str(tmp_path / "base_hf"), str(tmp_path / "adapter")
    export.export(base, base_hf, fmt)
    run_cli("cm3leon_jax.export", "--workdir", run, "--format", fmt, "--adapters_only", "--out", adapter,
            "--base_model", base_hf)
    with open(os.path.join(adapter, hf_interop.PEFT_CONFIG)) as f:
        adapter_cfg = json.load(f)
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["base_model_name_or_path"]) == (4, 8.0, base_hf)
    st = hf_interop.SafetensorsFile(os.path.join(adapter, hf_interop.PEFT_WEIGHTS))
    assert len(st.keys()) == 2 * 2 * len(targets.split(","))   # A and B, 2 layers, each target
    assert os.path.getsize(os.path.join(adapter, hf_interop.PEFT_WEIGHTS)) < \
        os.path.getsize(os.path.join(base_hf, "model.safetensors")) / 4

    ours, theirs, base_logits = _our_logits(run), _peft_logits(base_hf, adapter), _peft_logits(base_hf, None)
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
    assert np.abs(theirs - base_logits).max() > 100 * ATOL   # the adapters were trained off zero: they matter

    # ... and back: the adapter imported on the base workdir is the LoRA run, bit for bit
    back = str(tmp_path / "back")
    summary = import_hf.import_peft_adapter(adapter, base, back)
    assert summary["lora_targets"] == [t for t in lora.TARGETS if t in targets.split(",")]
    config, back_config = export.read_config(run), export.read_config(back)
    for field in ("lora_rank", "lora_alpha"):
        assert back_config.model[field] == config.model[field]
    mesh = sharding.make_mesh(config.mesh)
    first, _ = trainer.restore_run_params(run, config, mesh)
    again, step = trainer.restore_run_params(back, back_config, mesh)
    assert step == 0
    for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0] for t in (first, again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A random transformers Chameleon, and our workdir imported from it."""
    root = tmp_path_factory.mktemp("hf_base")
    cfg = model_lib.TransformerConfig.from_config(tiny_config(**CHAMELEON).model)
    hf_dir, base = str(root / "hf"), str(root / "base")
    hf_interop.random_hf_model(hf_interop.CHAMELEON, hf_interop.hf_config(cfg, hf_interop.CHAMELEON), hf_dir)
    import_hf.import_hf(hf_dir, base)
    os.makedirs(os.path.join(base, "vocab"))   # what Generator reads beside the params: the import copies it
    with open(os.path.join(base, "vocab", "vocab.json"), "w") as f:
        f.write("{}")
    return hf_dir, base


def _peft_adapter(hf_dir: str, out: str, seed: int = 0, **lora_config):
    """An adapter made by PEFT itself on the transformers model, with random A and B."""
    import peft
    import torch
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf_interop.load_hf_model(hf_dir),
                                peft.LoraConfig(init_lora_weights=False, **lora_config))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("lora_config", [
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "gate_proj", "up_proj"]),
])
def test_an_adapter_made_by_peft_imports_with_peft_logits(tmp_path, hf_base, lora_config):
    hf_dir, base = hf_base
    adapter = _peft_adapter(hf_dir, str(tmp_path / "adapter"), **lora_config)
    out = run_cli("cm3leon_jax.import_hf", "--hf_dir", adapter, "--base", base, "--workdir", tmp_path / "ours")
    assert json.loads(out.stdout.strip().splitlines()[-1])["lora_rank"] == lora_config["r"]
    assert (tmp_path / "ours" / "vocab" / "vocab.json").read_text() == "{}"
    theirs = _peft_logits(hf_dir, adapter)
    np.testing.assert_allclose(_our_logits(str(tmp_path / "ours")), theirs, atol=ATOL, rtol=0)
    assert np.abs(theirs - _peft_logits(hf_dir, None)).max() > 100 * ATOL


def test_merged_export_of_an_adapter_on_an_import_keeping_hf_ids_writes_its_ids(tmp_path):
    """import_hf without --remap_vocab -> a PEFT adapter imported on it (a LoRA run, init_from.json)
    -> its merged hf-chameleon export: config.json has the source checkpoint's token ids, found
    through the run's init_from.json (ours were written: generate stopped on the wrong token)."""
    cfg = model_lib.TransformerConfig.from_config(tiny_config(**CHAMELEON).model)
    ids = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)   # the hub's Chameleon ids
    hf_dir, base, run, out = (str(tmp_path / n) for n in ("hf", "base", "run", "out"))
    hf_interop.random_hf_model(hf_interop.CHAMELEON, dict(hf_interop.hf_config(cfg, hf_interop.CHAMELEON), **ids), hf_dir)
    import_hf.import_hf(hf_dir, base)
    adapter = _peft_adapter(hf_dir, str(tmp_path / "adapter"), r=4, lora_alpha=8, target_modules=["q_proj"])
    import_hf.import_peft_adapter(adapter, base, run)
    export.export(run, out, hf_interop.CHAMELEON)
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert {k: exported[k] for k in ids} == ids
    with open(os.path.join(out, "cm3leon_export.json")) as f:
        assert json.load(f)["token_ids"]["chain"] == [run, base]
    np.testing.assert_allclose(_peft_logits(out, None), _peft_logits(hf_dir, adapter), atol=ATOL, rtol=0)


def test_checkpoint_import_flags_with_a_peft_adapter_are_refused(tmp_path, hf_base):
    """--seq_len and --remap_vocab were dropped silently: the adapter's run takes base's config."""
    import subprocess
    import sys
    from tests.helpers import REPO, cli_env
    hf_dir, base = hf_base
    adapter = _peft_adapter(hf_dir, str(tmp_path / "adapter"), r=4, target_modules=["q_proj"])
    proc = subprocess.run([sys.executable, "-m", "cm3leon_jax.import_hf", "--hf_dir", adapter, "--base", base,
                           "--workdir", str(tmp_path / "ours"), "--seq_len", "8", "--remap_vocab"],
                          cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--remap_vocab, --seq_len apply to a checkpoint import" in proc.stderr
    assert not os.path.exists(tmp_path / "ours")


@pytest.mark.parametrize("lora_config,match", [
    (dict(r=4, target_modules=["q_proj"], use_dora=True), r"use_dora=True"),
    (dict(r=4, target_modules=["q_proj"], bias="lora_only"), r"bias='lora_only'"),
    (dict(r=4, target_modules=["q_proj"], layers_to_transform=[0]), r"layers_to_transform=\[0\]"),
    (dict(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}), r"rank_pattern"),
    (dict(r=4, target_modules=["q_proj", "embed_tokens"]), r"not LoRA A/B of a hf-chameleon layer projection.*embed_tokens"),
    (dict(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5]), r"alora_invocation_tokens=\[5\]"),
])
def test_peft_adapters_our_adapters_cannot_hold_are_refused(tmp_path, hf_base, lora_config, match):
    hf_dir, base = hf_base
    adapter = _peft_adapter(hf_dir, str(tmp_path / "adapter"), **lora_config)
    with pytest.raises(ValueError, match=match):
        import_hf.import_peft_adapter(adapter, base, str(tmp_path / "ours"))
    assert not os.path.exists(tmp_path / "ours" / "checkpoints")


@pytest.mark.parametrize("setting", [dict(use_bdlora={"target_modules_bd_a": ["q_proj"]}), dict(arrow_config={"top_k": 2}),
                                     dict(monteclora_config={"num_experts": 4}), dict(kasa_config={"rank": 4}), dict(use_qalora=True)])
def test_lora_variants_that_change_the_forward_pass_are_refused(setting):
    """Their tensors can look like plain LoRA's, so only the config tells (aLoRA: the case above)."""
    with pytest.raises(ValueError, match=f"{next(iter(setting))}="):
        hf_interop.adapter_fields_from_peft(dict(peft_type="LORA", r=4, lora_alpha=8, **setting))
    plain = dict(peft_type="LORA", r=4, lora_alpha=8, velora_config=None, loftq_config={}, eva_config=None)
    assert hf_interop.adapter_fields_from_peft(plain) == (4, 8.0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_adapters_saved_on_a_base_their_initialisation_changed_are_refused(init):
    """PiSSA and friends subtract their first adapter from the base weights, and PEFT redoes that on
    load: imported on the unchanged base such an adapter gave other logits (0.28 off, measured)."""
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'"):
        hf_interop.adapter_fields_from_peft(dict(peft_type="LORA", r=4, lora_alpha=8, init_lora_weights=init))
    for fine in (True, False, "gaussian", "eva", "orthogonal", "mica"):
        assert hf_interop.adapter_fields_from_peft(dict(peft_type="LORA", r=4, lora_alpha=8,
                                                        init_lora_weights=fine)) == (4, 8.0)


def test_adapters_only_export_needs_a_lora_run_with_a_base(tmp_path):
    plain = str(tmp_path / "plain")
    trainer.train(tiny_config(**dict(CHAMELEON, total_steps=2)), plain)
    with pytest.raises(ValueError, match=r"not a LoRA run"):
        export.export(plain, str(tmp_path / "a"), hf_interop.CHAMELEON, adapters_only=True)
    seeded = str(tmp_path / "seeded")   # a LoRA run on a randomly initialised model: nothing holds its base
    trainer.train(tiny_config(**dict(CHAMELEON, **{"total_steps": 2, "model.lora_rank": 2})), seeded)
    with pytest.raises(ValueError, match=r"no init_from.json.*without --adapters_only"):
        export.export(seeded, str(tmp_path / "b"), hf_interop.CHAMELEON, adapters_only=True)
    with pytest.raises(ValueError, match=r"PEFT adapter for an hf-\* format"):
        export.export(seeded, str(tmp_path / "c"), "params", adapters_only=True)
