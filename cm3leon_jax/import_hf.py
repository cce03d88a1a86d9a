"""Import a transformers OPT or Chameleon/Anole checkpoint as a workdir of ours.

    python -m cm3leon_jax.import_hf --hf_dir DIR --workdir OUT [--vocab FILE] [--remap_vocab]
        [--num_sentinels N] [--seq_len N] [--mesh_data 1 --mesh_fsdp -1 --mesh_tensor 1]
    python -m cm3leon_jax.import_hf --hf_dir PEFT_ADAPTER --base WORKDIR --workdir OUT [--base_step N]

A PEFT LoRA adapter dir (adapter_config.json) becomes a LoRA run of ours on top of WORKDIR
(`import_peft_adapter`): the model it was trained on, as our workdir.

The format comes from DIR/config.json's model_type (opt | chameleon). Writes
  OUT/config.json            a full training config (base_config + the HF architecture; Chameleon:
                             z-loss 1e-5, lr 1e-4 as its paper)
  OUT/checkpoints/0/         orbax, item `state` = {"params": ...}: what
                             `checkpointing.restore_params(OUT, abstract)` reads (fine-tuning,
                             evaluation); it holds no optimizer state or data position, so start
                             training runs in a fresh workdir with these params as initialisation
  OUT/hf_vocab_map.json      (when a vocabulary is found) HF ids <-> our id layout: specials,
                             sentinels, text, image codes (hf_interop.vocab_mapping); one found
                             beside the weights that cannot map (OPT's vocab.json has no <break>)
                             is left out, the reason in the summary's `not_carried`
  OUT/hf_ids.json            (without --remap_vocab: the model keeps HF ids) the source config.json's
                             pad/bos/eos_token_id, image_token_id and vocabulary_map, where set
                             (format cm3leon_jax.hf_ids/1, `ids`, `source`): `export --format hf-*` of
                             OUT, or of a run fine-tuned from it (init_from.json records followed back),
                             writes these into config.json instead of our layout's <pad> 0, <eos> 1
  OUT/hf_tokenizer/          the HF tokenizer files, copied for reference
  OUT/vocab/, OUT/vq/        our vocabulary on the checkpoint's tokenizer.json and Chameleon's VQ
                             encoder (below), so generate / sft_prepare run on OUT

Streaming: each parameter is created with `jax.make_array_from_callback` on its NamedSharding
from the Trainer's abstract state, and each device's shard is read from the memory-mapped
safetensors (tensor by tensor, layer by layer, only the slice that device holds), so no host ever
holds the whole model. On several hosts, run the same command on every host (as training).

Exactness: transformers tensors our model does not have (OPT's biases and LayerNorm affines) must
hold exactly the constants our model implies (0 and 1); otherwise the import refuses, naming the
tensor. OPT's position rows 0-1 (its offset) are dropped. Chameleon's `model.vqmodel.*` (the image
tokenizer's encoder and codebook) go to OUT/vq/.

Vocabulary: Chameleon/Anole keep image codes inside their BPE vocabulary (`IMGIMG...Z` tokens).
`--vocab` (a vocab.json, tokenizer.json, config.json or {token: id} file; default: the config's
`vocabulary_map`, else DIR/tokenizer.json or DIR/vocab.json) gives the mapping to our layout.
By default the model keeps HF ids (the mapping file says which are which); `--remap_vocab`
permutes the embedding and head rows so the model's ids ARE our layout (text and image codes
contiguous, as vocab.py expects). The mapping is checked against transformers' own
`ChameleonImageVocabularyMapping` on a byte-level BPE tokenizer.json (tests).

Text tokenizer and VQ (what `generate`, `sft_prepare` and evaluation need beside the params):
  OUT/vocab/     with --remap_vocab (the model's ids are then our layout) and a tokenizer.json
                 (DIR/tokenizer.json, or --vocab): our Vocabulary on the checkpoint's own
                 byte-level BPE (`hf_text_tokenizer`: tokenizer.json + the HF id of each text
                 piece), image codes from the IMGIMG tokens, image_tokens_per_image from the VQ
                 config. The tokenizer must name exactly the ids of the vocabulary the mapping came
                 from, and its image tokens must match the VQ codebook (ValueError otherwise).
                 Or, from an hf-* export of ours that kept our ids, its cm3leon_vocab/ as it is.
  OUT/vq/        Chameleon's `model.vqmodel.*` converted to our VQGAN (`hf_vq`), written as a
                 train_vq workdir (vq_config.json + checkpoints/0) that `VQTokenizer.from_workdir`,
                 `Generator` (an imported workdir's own vq/) and `sft_prepare --config.vq_workdir`
                 load. transformers holds no VQ decoder, so it encodes images but decoding raises.
                 Its `pixel_scale` is the image processor's (DIR/preprocessor_config.json's
                 rescale_factor, default Chameleon's 0.0078), so uint8 images get Chameleon's codes.
What is left out is listed in the summary's `not_carried`, with the reason.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from cm3leon_jax import checkpointing, export as export_lib, hf_interop, hf_text_tokenizer, hf_vq, model as model_lib, sharding, workdir_io

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer.model", "generation_config.json", hf_vq.PREPROCESSOR_CONFIG)
VOCAB_MAP_JSON = "hf_vocab_map.json"
VOCAB_DIR, VQ_DIR, HF_IDS_JSON = export_lib.VOCAB_DIR, export_lib.VQ_DIR, export_lib.HF_IDS_JSON


def _detect_prefix(ckpt: hf_interop.HFCheckpoint, fmt: str) -> str:
    candidates = ("model.decoder.", "decoder.") if fmt == hf_interop.OPT else ("model.", "")
    for prefix in candidates:
        if prefix + "embed_tokens.weight" in ckpt:
            return prefix
    raise ValueError(f"{ckpt.directory}: no {' or '.join(p + 'embed_tokens.weight' for p in candidates)} "
                     f"tensor; is this a {fmt} checkpoint?")


def _vocab_source(hf_dir: str, hf_cfg: dict, vocab_file: str | None) -> str | dict | None:
    if vocab_file:
        return vocab_file
    if isinstance(hf_cfg.get("vocabulary_map"), dict) and hf_cfg["vocabulary_map"]:
        return hf_cfg["vocabulary_map"]
    for name in ("tokenizer.json", "vocab.json"):
        if os.path.exists(os.path.join(hf_dir, name)):
            return os.path.join(hf_dir, name)
    return None


def check_tensors(ckpt: hf_interop.HFCheckpoint, specs, cfg: model_lib.TransformerConfig, hf_cfg: dict) -> list[str]:
    """Every expected tensor exists with its shape; constant tensors hold their constant exactly.
    Returns the checkpoint's tensors that are not used (logged by the caller)."""
    optional = set()
    if not hf_cfg.get("enable_bias", True):
        optional.add("bias")
    if not hf_cfg.get("layer_norm_elementwise_affine", True):
        optional.add("layer_norm")
    used, problems = set(), []
    for spec in specs:
        for layer in (range(cfg.num_layers) if spec.layered else [None]):
            name = spec.name(layer)
            if name not in ckpt:
                if spec.ours is None and any(o in name for o in optional):
                    continue
                problems.append(f"missing tensor {name}")
                continue
            used.add(name)
            if tuple(ckpt.shape(name)) != spec.hf_shape:
                problems.append(f"tensor {name} in {ckpt.file_of(name)} has shape {tuple(ckpt.shape(name))}, "
                                f"expected {spec.hf_shape} for the config")
                continue
            if spec.ours is None:
                value = np.asarray(ckpt.get(name), np.float32)
                want = 1.0 if spec.kind == "ones" else 0.0
                if not np.all(value == want):
                    problems.append(f"tensor {name} is not all {want:g} (max |x - {want:g}| = "
                                    f"{float(np.abs(value - want).max()):.3g}); our model has no such parameter "
                                    "(no biases; LayerNorm without weight/bias), so it cannot hold this checkpoint exactly")
    if problems:
        raise ValueError(f"{ckpt.directory}: " + "; ".join(problems[:20]) +
                         (f"; ... {len(problems) - 20} more" if len(problems) > 20 else ""))
    return [k for k in ckpt.keys() if k not in used]


def import_hf(hf_dir: str, workdir: str, *, vocab_file: str | None = None, remap_vocab: bool = False,
              num_sentinels: int | None = None, seq_len: int | None = None, mesh_config=None) -> dict:
    """Writes the workdir (module docstring); returns a summary dict. A local directory: copy it to
    a bucket afterwards (`gsutil -m cp -r`) to fine-tune from it on a pod."""
    workdir = workdir_io.require_local(workdir, "--workdir")   # (absolute, `~` expanded)
    _check_new_workdir(workdir)
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        hf_cfg = json.load(f)
    config = hf_interop.training_config_from_hf(hf_cfg, seq_len)
    fmt, _ = hf_interop.model_fields_from_hf(hf_cfg)
    cfg = model_lib.TransformerConfig.from_config(config.model)
    ckpt = hf_interop.HFCheckpoint(hf_dir)
    specs = hf_interop.tensor_specs(cfg, fmt, prefix=_detect_prefix(ckpt, fmt))
    unused = check_tensors(ckpt, specs, cfg, hf_cfg)
    not_carried = []
    vq_config, vq_params = _vq(ckpt, hf_cfg, fmt, not_carried)
    unused = [k for k in unused if vq_params is None or ".vqmodel." not in f".{k}"]
    if unused:
        logging.warning("tensors not imported: %s", unused[:20])

    mapping, hf_vocab = None, None
    source = _vocab_source(hf_dir, hf_cfg, vocab_file)
    if source is not None:
        hf_vocab = source if isinstance(source, dict) else hf_interop.read_hf_vocab(source)
        try:
            mapping = hf_interop.vocab_mapping(hf_vocab, cfg.vocab_size, num_sentinels)
        except ValueError as e:
            # a map found beside the weights is a reference only (the model keeps HF ids): a
            # vocabulary without our specials (OPT's vocab.json) must not block the import
            if remap_vocab or vocab_file or num_sentinels is not None:
                raise
            not_carried.append(f"{VOCAB_MAP_JSON}: the vocabulary found in {hf_dir} does not map onto our id "
                               f"layout ({e}); the model keeps its HF ids")
            mapping, hf_vocab = None, None
    if remap_vocab and mapping is None:
        raise ValueError(f"--remap_vocab needs a vocabulary: pass --vocab, or put tokenizer.json/vocab.json in {hf_dir}")
    perm = np.asarray(mapping["ours_to_hf"]) if remap_vocab else None
    vocab = _vocabulary(hf_dir, vocab_file, hf_cfg, fmt, mapping, hf_vocab, remap_vocab, vq_config, not_carried)
    if vocab is None:
        vocab = _own_export_vocabulary(hf_dir, cfg.vocab_size, not_carried)

    if mesh_config is None:
        mesh = export_lib.default_mesh(config)
    else:
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(mesh_config)))
    _, abstract = export_lib.abstract_params(config, mesh)
    by_path = {spec.ours: spec for spec in specs if spec.ours is not None}
    flat = {}
    for key, a in traverse_util.flatten_dict(abstract).items():
        layered = key[:2] == ("layers", "layer")
        spec = by_path.get(key[2:] if layered else key)
        if spec is None:
            raise ValueError(f"no {fmt} tensor maps to our parameter {'/'.join(key)}")
        flat[key] = export_lib.make_sharded(a, _reader(ckpt, spec, cfg, layered, perm))
    params = traverse_util.unflatten_dict(flat)
    export_lib.save_params_checkpoint(workdir, 0, params)
    if jax.process_index() == 0:
        if mapping is not None:
            with open(os.path.join(workdir, VOCAB_MAP_JSON), "w", encoding="utf-8") as f:
                json.dump(dict(mapping, weights_remapped=bool(remap_vocab)), f)
        if not remap_vocab:   # the export of OUT (or of a run fine-tuned from it) writes these back
            with open(os.path.join(workdir, HF_IDS_JSON), "w", encoding="utf-8") as f:
                json.dump({"format": export_lib.HF_IDS_FORMAT,
                           "source": os.path.join(os.path.abspath(hf_dir), "config.json"),
                           "ids": {k: hf_cfg[k] for k in export_lib.HF_ID_FIELDS if k in hf_cfg}}, f, indent=2)
        if vocab is not None:
            vocab.save(os.path.join(workdir, VOCAB_DIR))
        tok_dir = os.path.join(workdir, "hf_tokenizer")
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(hf_dir, name)):
                os.makedirs(tok_dir, exist_ok=True)
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tok_dir, name))
    if vq_params is not None:
        from cm3leon_jax import vq_tokenizer
        export_lib.save_params_checkpoint(os.path.join(workdir, VQ_DIR), 0, vq_params)
        if jax.process_index() == 0:
            vq_tokenizer.save_vq_config(os.path.join(workdir, VQ_DIR), vq_config)
    _write_config_last(workdir, config)
    return {"format": fmt, "workdir": workdir, "num_params": int(sum(x.size for x in flat.values())),
            "vocab_mapping": mapping["layout"] if mapping else None, "weights_remapped": bool(remap_vocab),
            "not_imported": len(unused), "vocab": VOCAB_DIR if vocab is not None else None,
            "vq": VQ_DIR if vq_params is not None else None, "hf_ids": None if remap_vocab else HF_IDS_JSON,
            "not_carried": not_carried}


def _check_new_workdir(workdir: str) -> None:
    if os.path.exists(os.path.join(workdir, "config.json")):
        raise FileExistsError(f"{workdir} already holds a workdir (config.json); import into a new directory")
    if os.path.exists(os.path.join(workdir, "checkpoints")):   # config.json comes last: an import that was stopped
        raise FileExistsError(f"{workdir} holds checkpoints/ but no config.json: an import stopped before it finished "
                              "(or another kind of directory); delete it and import again, or import into a new directory")


def _write_config_last(workdir: str, config) -> None:
    """config.json, atomically, after every other file: a workdir with one is a finished import (one
    killed midway, e.g. before vq/, used to look finished and run without its VQ)."""
    if jax.process_index() == 0:
        workdir_io.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def is_peft_adapter(hf_dir: str) -> bool:
    return os.path.exists(os.path.join(hf_dir, hf_interop.PEFT_CONFIG))


def import_peft_adapter(adapter_dir: str, base: str, workdir: str, *, base_step: int | None = None,
                        mesh_config=None) -> dict:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors), trained in transformers
    on the hf-* export of our workdir `base` (or on the checkpoint `base` was imported from), as a
    LoRA run of ours: OUT/config.json is base's with the adapter's rank, alpha and targets and
    init_from = base, OUT/init_from.json names base's step, OUT/checkpoints/0 holds the adapters.
    `Generator`, `evaluate` and `export` read it like any LoRA run (merged into base's weights);
    `config.init_from = OUT` fine-tunes on from the merged model. Anything PEFT holds that our
    adapters cannot (DoRA, aLoRA and other LoRA variants, biases, other modules, per-layer ranks, some layers only) is refused."""
    from cm3leon_jax import lora, trainer as trainer_lib
    workdir = workdir_io.require_local(workdir, "--workdir")   # (absolute, `~` expanded)
    _check_new_workdir(workdir)
    with open(os.path.join(adapter_dir, hf_interop.PEFT_CONFIG), encoding="utf-8") as f:
        peft_cfg = json.load(f)
    rank, alpha = hf_interop.adapter_fields_from_peft(peft_cfg)
    weights = os.path.join(adapter_dir, hf_interop.PEFT_WEIGHTS)
    if not os.path.exists(weights):
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(adapter_dir, n))]
        raise FileNotFoundError(f"{adapter_dir} has no {hf_interop.PEFT_WEIGHTS}" + (
            f" ({pickled[0]} is a pickle, which is never loaded: save the adapter with safe_serialization=True)"
            if pickled else ""))
    base = workdir_io.resolve(base)
    config = export_lib.read_config(base)
    steps = checkpointing.saved_steps(base)
    if not steps or (base_step is not None and int(base_step) not in steps):
        raise FileNotFoundError(f"--base {base} holds no checkpoint" + (f" of step {base_step} (it holds {steps})"
                                                                         if steps else ""))
    base_step = steps[-1] if base_step is None else int(base_step)
    base_cfg = model_lib.TransformerConfig.from_config(config.model)
    formats = [fmt for fmt in hf_interop.FORMATS if _fits(base_cfg, fmt)]
    if not formats:
        raise ValueError(f"the model of {base} has no Hugging Face format (hf_interop.check_exportable), so no PEFT "
                         "adapter names its modules")
    specs = hf_interop.adapter_specs(base_cfg, formats[0])
    st = hf_interop.SafetensorsFile(weights)
    found, unmatched = {}, []
    for key in st.keys():
        hit = next(((spec, m) for spec in specs for m in [_peft_key(spec).match(key)] if m), None)
        if hit is None:
            unmatched.append(key)
            continue
        spec, m = hit
        found[(spec.target, int(m.group(1)), m.group(2))] = key
    if unmatched:
        raise ValueError(f"{weights}: tensors that are not LoRA A/B of a {formats[0]} layer projection, which our "
                         f"adapters cannot hold: {unmatched[:10]}" + (f" ... {len(unmatched) - 10} more" if len(unmatched) > 10 else ""))
    targets = [t for t in lora.TARGETS if any(k[0] == t for k in found)]
    if not targets:
        raise ValueError(f"{weights} holds no LoRA tensor")
    missing = [f"{t} layer {i} lora_{w}" for t in targets for i in range(base_cfg.num_layers) for w in "AB"
               if (t, i, w) not in found]
    extra = sorted({i for _, i, _ in found if i >= base_cfg.num_layers})
    if missing or extra:
        raise ValueError(f"{weights}: adapters must cover every layer of every projection they touch (ours are stacked "
                         f"per layer): missing {missing[:10]}" + (f"; layers beyond the base's {base_cfg.num_layers}: "
                                                                   f"{extra}" if extra else ""))
    config.model.update(lora_rank=rank, lora_alpha=alpha, lora_targets=",".join(targets), lora_base_int8=False)
    config.init_from = base
    mesh = export_lib.default_mesh(config) if mesh_config is None else \
        sharding.make_mesh(ml_collections.ConfigDict(dict(mesh_config)))
    _, abstract = export_lib.abstract_params(config, mesh)
    by_path = {spec.path: spec for spec in specs}
    flat = {}
    for key, a in traverse_util.flatten_dict(lora.split(abstract)[0]).items():
        layered = key[:2] == ("layers", "layer")
        spec = by_path[key[2:-1]]
        layer = None if layered else int(key[0].split("_")[-1])
        flat[key] = export_lib.make_sharded(a, _adapter_reader(st, found, spec, key[-1], a.shape, layered, layer))
    adapters = traverse_util.unflatten_dict(flat)
    export_lib.save_params_checkpoint(workdir, 0, adapters)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, trainer_lib.INIT_FROM_FILE), "w", encoding="utf-8") as f:
            json.dump({"workdir": base, "step": int(base_step)}, f, indent=2)
        shutil.copyfile(os.path.join(adapter_dir, hf_interop.PEFT_CONFIG), os.path.join(workdir, hf_interop.PEFT_CONFIG))
        for name in (VOCAB_DIR, VQ_DIR):   # what Generator reads beside the params (base may be a bucket)
            workdir_io.copy_tree(workdir_io.join(base, name), os.path.join(workdir, name))
    _write_config_last(workdir, config)
    return {"format": formats[0], "workdir": workdir, "adapter": adapter_dir, "base": base, "base_step": int(base_step),
            "lora_rank": rank, "lora_alpha": alpha, "lora_targets": targets,
            "num_adapter_params": int(sum(x.size for x in flat.values()))}


def _fits(cfg, fmt: str) -> bool:
    try:
        hf_interop.check_exportable(cfg, fmt)
        return True
    except ValueError:
        return False


def _peft_key(spec) -> "re.Pattern":
    """PEFT's name of `spec`'s lora_A/B in any wrapper (CausalLM or bare model): (layer, A|B)."""
    suffix = spec.module.split("{i}.", 1)[1]
    return re.compile(r"^(?:.*\.)?layers\.(\d+)\." + re.escape(suffix) + r"\.lora_([AB])\.weight$")


def _adapter_reader(st, found, spec, name: str, shape, layered: bool, layer: int | None):
    """read(index) -> this shard of our adapter `name` (lora_a | lora_b), from PEFT's tensors."""
    per_layer = tuple(shape[1:] if layered else shape)
    which = "A" if name == "lora_a" else "B"
    # PEFT's lora_A is [r, in], lora_B [out, r]
    want = (per_layer[-1], math.prod(per_layer[:-1])) if which == "A" else (math.prod(per_layer[1:]), per_layer[0])

    def one(i):
        key = found[(spec.target, i, which)]
        if tuple(st.shape(key)) != want:
            raise ValueError(f"{st.path}: {key} has shape {tuple(st.shape(key))}, expected {want} for the base model "
                             f"at the adapter's r")
        return hf_interop.adapter_from_hf(np.asarray(st.get(key), np.float32), per_layer)

    def read(index):
        if not layered:
            return one(layer)[index]
        return np.stack([one(i)[index[1:]] for i in range(shape[0])[index[0]]])

    return read


def _vq(ckpt, hf_cfg: dict, fmt: str, not_carried: list) -> tuple:
    """(VQGANConfig, params) of Chameleon's converted VQ; (config or None, None) when it is not
    carried (the reason goes to `not_carried`). Tensors that contradict vq_config raise."""
    if fmt != hf_interop.CHAMELEON:
        return None, None
    prefix = hf_vq.vq_prefix(ckpt.keys())
    preprocessor = None
    path = os.path.join(ckpt.directory, hf_vq.PREPROCESSOR_CONFIG)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            preprocessor = json.load(f)
    try:
        config = hf_vq.config_from_hf(hf_cfg.get("vq_config") or {}, hf_vq.pixel_scale_from_hf(preprocessor))
    except ValueError as e:
        not_carried.append(f"vq/: {e}")
        return None, None
    if prefix is None:
        not_carried.append("vq/: the checkpoint holds no vqmodel.* tensors (Chameleon's VQ image tokenizer)")
        return config, None
    return config, hf_vq.params_from_hf(ckpt.get, ckpt.keys(), config, prefix)


def _tokenizer_json(hf_dir: str, vocab_file: str | None) -> str | None:
    """--vocab when it is a tokenizer.json (has a `model`), else DIR/tokenizer.json if present."""
    if vocab_file:
        with open(vocab_file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError:
                data = None
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            return vocab_file
    path = os.path.join(hf_dir, hf_text_tokenizer.TOKENIZER_JSON)
    return path if os.path.exists(path) else None


def _vocabulary(hf_dir, vocab_file, hf_cfg, fmt, mapping, hf_vocab, remap_vocab, vq_config, not_carried):
    """Our Vocabulary on the checkpoint's tokenizer.json (module doc), or None with the reason in
    `not_carried`; ValueError when the tokenizer does not belong to the checkpoint."""
    from cm3leon_jax import vocab as vocab_lib
    path = _tokenizer_json(hf_dir, vocab_file)
    reason = None
    if path is None:
        reason = f"no tokenizer.json in {hf_dir} (or --vocab)"
    elif mapping is None:
        reason = f"no mapping of the vocabulary onto our id layout (see {VOCAB_MAP_JSON} above)"
    elif not remap_vocab:
        reason = "the model keeps HF ids (hf_vocab_map.json); import with --remap_vocab to get ids in our layout"
    elif not mapping["layout"]["num_image_codes"]:
        reason = "the vocabulary has no image tokens (IMGIMG...), and our Vocabulary holds images"
    elif vq_config is None:
        reason = "no VQ config to give the image token grid"
    if reason:
        not_carried.append(f"vocab/: {reason}")
        return None
    lay, o2h = mapping["layout"], mapping["ours_to_hf"]
    tok = hf_text_tokenizer.HFTextTokenizer(path, o2h[lay["text_offset"]:lay["image_offset"]])
    theirs = tok.hf_vocab()
    if theirs != hf_vocab:
        diff = sorted(set(theirs.items()) ^ set(hf_vocab.items()), key=lambda kv: kv[1])
        raise ValueError(f"{path} is not the tokenizer of this checkpoint: its {len(theirs)} tokens differ from the "
                         f"{len(hf_vocab)} of the vocabulary the model's ids were mapped with (vocab_size "
                         f"{lay['vocab_size']}) at {len(diff)} entries, e.g. {diff[:3]}")
    if lay["num_image_codes"] != vq_config.codebook_size:
        raise ValueError(f"the vocabulary has {lay['num_image_codes']} image tokens but the VQ codebook has "
                         f"{vq_config.codebook_size} codes")
    vocab = vocab_lib.Vocabulary(tok, lay["num_image_codes"], vq_config.tokens_per_image, lay["num_sentinels"])
    assert (vocab.text_offset, vocab.image_offset, vocab.size) == (lay["text_offset"], lay["image_offset"], lay["size"])
    return vocab


def _own_export_vocabulary(hf_dir, vocab_size: int, not_carried: list):
    """Our Vocabulary from an hf-* export of ours (DIR/cm3leon_vocab/) whose weights kept our id
    layout (cm3leon_export.json's token_ids.layout "ours"): the model's ids are that vocabulary's,
    so export -> import -> generate works without a tokenizer.json (else OUT had no vocab/ and
    generate stopped at "no saved vocabulary"). None otherwise, `not_carried` as it was."""
    from cm3leon_jax import vocab as vocab_lib
    path = os.path.join(hf_dir, "cm3leon_vocab")
    try:
        with open(os.path.join(hf_dir, "cm3leon_export.json"), encoding="utf-8") as f:
            layout = json.load(f).get("token_ids", {}).get("layout")
    except (OSError, ValueError):
        return None
    if layout != "ours" or not vocab_lib.Vocabulary.saved_in(path):
        return None
    vocab = vocab_lib.Vocabulary.load(path)
    if vocab.size > vocab_size:
        raise ValueError(f"{path} holds {vocab.size} ids but the model's vocab_size is {vocab_size}")
    not_carried[:] = [n for n in not_carried if not n.startswith(f"{VOCAB_DIR}/:")]
    return vocab


def _reader(ckpt, spec, cfg, layered: bool, perm):
    """read(index) -> this shard of our parameter, from the memory-mapped HF tensor(s)."""

    def one(layer, idx):
        t = ckpt.get(spec.name(layer))
        if perm is not None and spec.ours == ("token_embedding",):      # ours [V, d]: rows perm
            rows = perm[idx[0]]
            return np.asarray(t[np.sort(rows)][np.argsort(np.argsort(rows))][:, idx[1]])
        if perm is not None and spec.ours == ("output_head", "kernel"):  # ours [d, V] = HF[V, d].T
            cols = perm[idx[1]]
            return np.asarray(t[np.sort(cols)][np.argsort(np.argsort(cols))][:, idx[0]].T)
        return np.asarray(hf_interop.from_hf(spec.kind, t, cfg)[idx])

    def read(index):
        if not layered:
            return one(None, index)
        layers = range(cfg.num_layers)[index[0]]
        return np.stack([one(layer, index[1:]) for layer in layers])

    return read


# ----------------------------------------------------------------------------- CLI


def _define_flags():
    from absl import flags
    flags.DEFINE_string("hf_dir", None, "transformers folder (config.json + safetensors), or a PEFT LoRA adapter "
                        "folder (adapter_config.json + adapter_model.safetensors) with --base", required=True)
    flags.DEFINE_string("base", None, "with a PEFT adapter: our workdir of the model it was trained on (imported "
                        "with this command, or the run whose hf-* export it was trained on)")
    flags.DEFINE_integer("base_step", None, "with --base: its checkpoint step (default: the latest)")
    flags.DEFINE_string("workdir", None, "new workdir to write", required=True)
    flags.DEFINE_string("vocab", None, "vocab.json / tokenizer.json / {token: id} mapping of the HF vocabulary")
    flags.DEFINE_bool("remap_vocab", False, "permute embedding/head rows into our id layout")
    flags.DEFINE_integer("num_sentinels", None, "sentinels in our layout (default: as many as the HF vocab spells)")
    flags.DEFINE_integer("seq_len", None, "data.seq_len of the written config (default min(max_positions, 4096))")
    flags.DEFINE_integer("mesh_data", None, "mesh to stream into (default: fsdp over all devices); an axis not "
                         "given is data 1, fsdp -1 (the remaining devices), tensor 1")
    flags.DEFINE_integer("mesh_fsdp", None, "")
    flags.DEFINE_integer("mesh_tensor", None, "")
    return flags.FLAGS


def cli_mesh(data: int | None, fsdp: int | None, tensor: int | None) -> dict | None:
    """The --mesh_* flags as a mesh config (None: none given, the default mesh). An axis not given is
    data 1, fsdp -1 (the remaining devices, unless another axis already is -1), tensor 1: the usage
    line's defaults, so `--mesh_tensor 2` alone fills the rest with fsdp."""
    if data is None and fsdp is None and tensor is None:
        return None
    data, tensor = 1 if data is None else data, 1 if tensor is None else tensor
    if fsdp is None:
        fsdp = 1 if -1 in (data, tensor) else -1
    return dict(data=data, fsdp=fsdp, tensor=tensor)


def main(argv):
    del argv
    FLAGS = _FLAGS
    mesh = cli_mesh(FLAGS.mesh_data, FLAGS.mesh_fsdp, FLAGS.mesh_tensor)
    try:
        if is_peft_adapter(FLAGS.hf_dir):
            if not FLAGS.base:
                raise ValueError(f"{FLAGS.hf_dir} is a PEFT adapter: name the workdir of the model it adapts (--base)")
            ignored = [f"--{name}" for name in ("vocab", "remap_vocab", "num_sentinels", "seq_len")
                       if FLAGS[name].present]   # the adapter takes them all from --base
            if ignored:
                raise ValueError(f"{', '.join(ignored)} apply to a checkpoint import; a PEFT adapter takes its vocabulary "
                                 "and config from --base")
            summary = import_peft_adapter(FLAGS.hf_dir, FLAGS.base, FLAGS.workdir, base_step=FLAGS.base_step,
                                          mesh_config=mesh)
        elif FLAGS.base or FLAGS.base_step is not None:
            raise ValueError(f"--base/--base_step go with a PEFT adapter; {FLAGS.hf_dir} has no "
                             f"{hf_interop.PEFT_CONFIG}")
        else:
            summary = import_hf(FLAGS.hf_dir, FLAGS.workdir, vocab_file=FLAGS.vocab, remap_vocab=FLAGS.remap_vocab,
                                num_sentinels=FLAGS.num_sentinels, seq_len=FLAGS.seq_len, mesh_config=mesh)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"import failed: {e}") from None
    print(json.dumps(summary))


if __name__ == "__main__":
    from absl import app
    _FLAGS = _define_flags()
    app.run(main)
