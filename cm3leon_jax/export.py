"""Export a training workdir's parameters for evaluation, serving and other frameworks.

    python -m cm3leon_jax.export --workdir DIR [--step N] --format params --out OUT [--vq_workdir VQ]
    python -m cm3leon_jax.export --workdir DIR [--step N] --format hf-opt --out OUT [--dtype bfloat16]
    python -m cm3leon_jax.export --workdir DIR [--step N] --format hf-chameleon --out OUT
    python -m cm3leon_jax.export --workdir LORA_RUN --format hf-chameleon|hf-opt --adapters_only --out OUT
                                 [--base_model BASE_HF] [--dtype bfloat16]

Formats:
  params        a self-describing bundle, parameters only (no optimizer state):
                  OUT/checkpoints/STEP/   orbax (item `state` = {"params": ...}), the layout
                                          `checkpointing.restore_params(OUT, ...)` reads, so
                                          OUT works wherever a workdir's params are loaded
                  OUT/model.safetensors   the same params, names '/'-joined
                                          ("layers/layer/attention/query/kernel", stacked)
                  OUT/config.json         the training config
                  OUT/vocab/              the vocabulary (vocab.json + spm.model), when the workdir has one
                  OUT/vq/                 the VQ image tokenizer (--vq_workdir, default the one the data's
                                          ingest report names): vq_config.json, model.safetensors and
                                          checkpoints/STEP, so OUT/vq is also a train_vq workdir
                  OUT/bundle.json         manifest: format, step, every file's size and sha256 (the
                                          orbax copies excepted), every tensor's shape and dtype
                `load_bundle(OUT)` verifies it all and returns (config, params); `load_bundle_vq(OUT)`
                the VQTokenizer. `generate.Generator(OUT)` (hence evaluation) runs from the bundle
                alone through `restore_params` and `load_vq_tokenizer`, which take a workdir or a
                bundle. A bundle holds no retriever or ScaNN index: retrieval needs the data dir.
  hf-opt        a transformers OPTForCausalLM folder (config.json + model.safetensors)
  hf-chameleon  a transformers ChameleonForConditionalGeneration folder: the language model and,
                when the VQ tokenizer (--vq_workdir, else as `load_vq_tokenizer` finds it) fits
                transformers' ChameleonVQVAE (hf_vq.hf_config), its encoder and codebook as
                `model.vqmodel` (no decoder: transformers has none); otherwise transformers
                initialises `model.vqmodel` at random with a warning, and cm3leon_export.json's
                `vqmodel` says why. A --vq_workdir that does not fit is refused. With the
                vqmodel goes preprocessor_config.json (Chameleon's image processor with our
                pixel_scale), so transformers' processor feeds it the pixels ours does.
  --adapters_only  a LoRA run's adapters alone as a Hugging Face PEFT LoRA adapter
                (adapter_config.json + adapter_model.safetensors) for the hf-* export of the
                checkpoint the run fine-tuned (its init_from.json; cm3leon_export.json gives the
                command that exports that base): `PeftModel.from_pretrained(base, OUT)`.
Token ids in the hf-* config.json: our layout's (<pad> 0, bos = eos = <eos> 1; hf-chameleon's
vocabulary_map from the workdir's vocab/), except for a checkpoint imported without --remap_vocab,
whose weights keep its HF ids, and runs fine-tuned from it: there the ids and vocabulary_map its
import recorded (import_hf's hf_ids.json, found through init_from.json records: `hf_ids_record`).
cm3leon_export.json's `token_ids` says which, and from where.
See hf_interop.py for what each HF format can hold; a config it cannot hold exactly is refused
before anything is read. Parameters move one tensor (one layer) at a time. Run it as one process.

Nothing here imports torch or transformers.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from cm3leon_jax import checkpointing, hf_interop, hf_vq, lora, model as model_lib, sharding, workdir_io

BUNDLE_FORMAT = "cm3leon_jax.bundle/1"
BUNDLE_JSON = "bundle.json"
SAFETENSORS = "model.safetensors"
VOCAB_DIR = "vocab"
VQ_DIR = "vq"
INGEST_REPORT = "ingest_report.json"  # data_pipeline.prepare.REPORT_FILE
HF_IDS_JSON = "hf_ids.json"   # import_hf without --remap_vocab: the source config's token ids (hf_ids_record)
HF_IDS_FORMAT = "cm3leon_jax.hf_ids/1"
HF_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "image_token_id", "vocabulary_map")
FORMATS = ("params",) + hf_interop.FORMATS


# ----------------------------------------------------------------------------- shared helpers


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = workdir_io.join(workdir, "config.json")
    if not workdir_io.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(json.loads(workdir_io.read_text(path)))


def default_mesh(config) -> jax.sharding.Mesh:
    """All local devices on `fsdp` when d_model splits evenly over them (each device holds a
    slice of every parameter), else replicated."""
    n = len(jax.devices())
    fsdp = n if int(config.model.d_model) % n == 0 else 1
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=n // fsdp, fsdp=fsdp, tensor=1)))


def abstract_params(config, mesh=None):
    """(model config, ShapeDtypeStructs with NamedShardings) of `config`'s params on `mesh`."""
    from cm3leon_jax import trainer as trainer_lib
    trainer = trainer_lib.Trainer(config, mesh or default_mesh(config))
    return trainer.model_config, trainer.abstract_state.params


def make_sharded(abstract: jax.ShapeDtypeStruct, read: Callable[[tuple], np.ndarray]) -> jax.Array:
    """A jax.Array with `abstract`'s shape, dtype and sharding, each local device's shard read by
    `read(index)` (a tuple of slices): only the slices this host's devices need are ever read."""
    dtype = np.dtype(abstract.dtype)

    def callback(index):
        index = tuple(index) + (slice(None),) * (len(abstract.shape) - len(index))
        out = np.asarray(read(index)).astype(dtype, copy=False)
        want = tuple(len(range(*s.indices(n))) for s, n in zip(index, abstract.shape))
        if out.shape != want:
            raise ValueError(f"read a shard of shape {out.shape}, expected {want}")
        return out

    return jax.make_array_from_callback(abstract.shape, abstract.sharding, callback)


def save_params_checkpoint(workdir: str, step: int, params) -> str:
    """Writes params as WORKDIR/checkpoints/STEP with item `state` = {"params": params}: what
    `checkpointing.restore_params(WORKDIR, abstract)` restores. Returns the step directory."""
    import orbax.checkpoint as ocp
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, save_interval_steps=1)
    manager = ocp.CheckpointManager(directory, item_names=("state",), options=options)
    if manager.latest_step() is not None:
        manager.close()
        raise FileExistsError(f"{directory} already holds checkpoints; use a new directory")
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})), force=True)
    manager.wait_until_finished()
    manager.close()
    return os.path.join(directory, str(int(step)))


def load_workdir_params(workdir: str, step: int | None = None, mesh=None):
    """(config, model config, params, step) of a workdir's checkpoint, optimizer state unread; a
    LoRA run's adapters merged into its kernels (`merge_adapters`)."""
    config = read_config(workdir)
    if config.model.get("lora_rank", 0):   # its checkpoints hold the adapters; merged into the weights it started from
        from cm3leon_jax import trainer as trainer_lib
        params, step = trainer_lib.restore_run_params(workdir, config, mesh or default_mesh(config), step)
        config, model_cfg, params = merge_adapters(config, params, mesh)
    else:
        model_cfg, abstract = abstract_params(config, mesh)
        params, step = checkpointing.restore_params(workdir, abstract, step)
    return config, model_cfg, params, int(step)


def merge_adapters(config, params, mesh=None):
    """A LoRA run's (config, model config, params) as the plain model's: each adapter folded into
    its kernel (lora.merge_params_like), model.lora_rank 0, the params in that model's shardings.
    Export and decoding go through this, so an adapted model costs exactly what its base does."""
    rank, alpha = int(config.model.lora_rank), float(config.model.lora_alpha)
    config = config.copy_and_resolve_references()
    config.model.lora_rank = 0
    config.model.lora_base_int8 = False
    model_cfg, abstract = abstract_params(config, mesh)
    return config, model_cfg, lora.merge_params_like(params, rank, alpha, abstract)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _prepare_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):   # (os.listdir's NotADirectoryError escaped the CLI's message)
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"--out {out} exists and is not empty")
    os.makedirs(out, exist_ok=True)


def _dtype_name(dtype) -> str:
    return str(np.dtype(dtype)) if np.dtype(dtype).name != "bfloat16" else "bfloat16"


def _chunks(x, layered: bool):
    """Host chunks of a (possibly sharded) array: one layer at a time for stacked params."""
    if layered:
        for i in range(x.shape[0]):
            yield np.asarray(jax.device_get(x[i:i + 1]))
    else:
        yield np.asarray(jax.device_get(x))


# ----------------------------------------------------------------------------- params bundle


def data_vq_workdir(data_dir: str) -> str:
    """The VQ tokenizer workdir the training data was made with (its ingest report), or ''."""
    path = os.path.join(data_dir or "", INGEST_REPORT)
    if not data_dir or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("vq_workdir", "") or ""


def _write_params(out: str, step: int, params, layered_prefix: str | None) -> tuple[dict, str]:
    """OUT/checkpoints/STEP (orbax) + OUT/model.safetensors of `params`; returns (tensor table, sha256).
    Tensors under `layered_prefix` (stacked layers) are written one layer at a time."""
    save_params_checkpoint(out, step, params)
    flat = traverse_util.flatten_dict(params, sep="/")
    entries = [(name, tuple(x.shape), _dtype_name(x.dtype),
                (lambda x=x, layered=bool(layered_prefix) and name.startswith(layered_prefix): _chunks(x, layered)))
               for name, x in sorted(flat.items())]
    sha = hf_interop.write_safetensors(os.path.join(out, SAFETENSORS), entries,
                                       metadata={"format": "cm3leon_jax", "step": step})
    return {name: {"shape": list(shape), "dtype": dtype} for name, shape, dtype, _ in entries}, sha


def _num_params(tensors: dict) -> int:
    return int(sum(int(np.prod(t["shape"])) for t in tensors.values()))


def check_vq_fits_vocab(vq, vocab, source) -> None:
    """A VQ tokenizer (or its config) must make the vocabulary's codes per image from its number of
    codes: a bigger codebook decodes every image with the wrong codes, silently."""
    if (vq.tokens_per_image, vq.codebook_size) != (vocab.image_tokens_per_image, vocab.num_image_codes):
        raise ValueError(f"the VQ tokenizer in {source} makes {vq.tokens_per_image} codes per image from "
                         f"{vq.codebook_size}; the vocabulary expects {vocab.image_tokens_per_image} from "
                         f"{vocab.num_image_codes}")


def export_params(workdir: str, out: str, step: int | None = None, vq_workdir: str | None = None) -> dict:
    """Writes the params bundle (module docstring); returns the manifest. The VQ tokenizer is
    `vq_workdir`, else the one the data's ingest report names (none for text-only data)."""
    from cm3leon_jax import vq_tokenizer
    config = read_config(workdir)
    vq_workdir = vq_workdir or data_vq_workdir(config.data.get("data_dir", ""))
    vq_config = vq_tokenizer.load_vq_config(vq_workdir) if vq_workdir else None  # refuse before writing
    vocab = _workdir_vocab(workdir)
    if vocab is not None and vq_config is not None:
        check_vq_fits_vocab(vq_config, vocab, vq_workdir)
    _prepare_out(out)
    config, model_cfg, params, step = load_workdir_params(workdir, step)
    tensors, sha = _write_params(out, step, params, "layers/")
    if read_config(workdir).model.get("lora_rank", 0):   # adapters merged: the plain model's config
        workdir_io.write_text(os.path.join(out, "config.json"), config.to_json_best_effort(indent=2))
    else:
        workdir_io.write_bytes(os.path.join(out, "config.json"), workdir_io.read_bytes(workdir_io.join(workdir, "config.json")))
    files = {SAFETENSORS: {"bytes": os.path.getsize(os.path.join(out, SAFETENSORS)), "sha256": sha}}
    if vocab is not None:
        vocab.save(os.path.join(out, VOCAB_DIR))
    vq_entry = None
    if vq_config is not None:
        vq_params, vq_step = checkpointing.restore_params(vq_workdir, vq_tokenizer.abstract_params(vq_config))
        vq_out = os.path.join(out, VQ_DIR)
        vq_tensors, vq_sha = _write_params(vq_out, int(vq_step), vq_params, None)
        vq_tokenizer.save_vq_config(vq_out, vq_config)
        vq_st = f"{VQ_DIR}/{SAFETENSORS}"
        files[vq_st] = {"bytes": os.path.getsize(os.path.join(out, vq_st)), "sha256": vq_sha}
        vq_entry = {"source_workdir": os.path.abspath(vq_workdir), "step": int(vq_step),
                    "orbax": f"{VQ_DIR}/checkpoints/{int(vq_step)}", "safetensors": vq_st,
                    "config": f"{VQ_DIR}/{vq_tokenizer.VQ_CONFIG_FILE}", "num_params": _num_params(vq_tensors),
                    "tensors": vq_tensors}
    for root, _, names in os.walk(out):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, out).replace(os.sep, "/")
            if rel in files or "checkpoints" in rel.split("/"):  # orbax copies: restore_params' layout
                continue
            files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {
        "format": BUNDLE_FORMAT, "step": step, "source_workdir": workdir_io.resolve(workdir),
        "orbax": f"checkpoints/{step}", "safetensors": SAFETENSORS,
        "num_params": _num_params(tensors), "tensors": tensors,
        "vocab": VOCAB_DIR if vocab is not None else None, "vq": vq_entry, "retrieval": None,
        "files": dict(sorted(files.items())),
    }
    with open(os.path.join(out, BUNDLE_JSON), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def _workdir_vocab(workdir: str):
    """The workdir's vocab/ (local or in a bucket) loaded, None when it has none."""
    from cm3leon_jax import vocab as vocab_lib
    path = workdir_io.join(workdir, VOCAB_DIR)
    return vocab_lib.Vocabulary.load(path) if vocab_lib.Vocabulary.saved_in(path) else None


def is_bundle(path: str) -> bool:
    return not workdir_io.is_remote(path) and os.path.exists(os.path.join(path, BUNDLE_JSON))


def read_manifest(directory: str, *, verify_checksums: bool = True, under: str | None = None) -> dict:
    """The bundle's manifest after checking every listed file (or those under `under`) exists
    with its size and sha256; a ValueError names the first file that does not."""
    manifest = workdir_io.read_format_json(os.path.join(directory, BUNDLE_JSON), BUNDLE_FORMAT,
                                           what="params bundle manifest",
                                           hint="python -m cm3leon_jax.export --format params")
    for rel, info in manifest["files"].items():
        if under is not None and not rel.startswith(under + "/"):
            continue
        file = os.path.join(directory, rel)
        if not os.path.exists(file):
            raise ValueError(f"{file}: listed in {BUNDLE_JSON} but missing")
        if os.path.getsize(file) != info["bytes"]:
            raise ValueError(f"{file}: {os.path.getsize(file)} bytes, the manifest says {info['bytes']} "
                             "(truncated or replaced)")
        if verify_checksums and _sha256(file) != info["sha256"]:
            raise ValueError(f"{file}: sha256 does not match {BUNDLE_JSON} (the file is corrupted or was modified)")
    return manifest


def _read_tensors(path: str, expected: dict, listed: dict, against: str, abstract=None):
    """The params tree in safetensors `path`, after checking every tensor's name, shape and dtype
    against `expected` (what `against` describes) and the manifest's table `listed`. With
    `abstract` (ShapeDtypeStructs with shardings) jax.Arrays read shard by shard, else numpy."""
    st = hf_interop.SafetensorsFile(path)
    problems = []
    for name in sorted(set(expected) | set(st.keys())):
        if name not in st:
            problems.append(f"tensor {name} is missing")
        elif name not in expected:
            problems.append(f"unexpected tensor {name} (not in the config's model)")
        else:
            shape, dtype = expected[name]
            if st.shape(name) != shape:
                problems.append(f"tensor {name} has shape {st.shape(name)}, the config's model needs {shape}")
            elif st.dtype(name) != dtype:
                problems.append(f"tensor {name} has dtype {st.dtype(name)}, the config's model needs {dtype}")
            elif listed.get(name, {}).get("shape") != list(shape):
                problems.append(f"tensor {name}: shape differs from {BUNDLE_JSON}")
    flat_abstract = traverse_util.flatten_dict(abstract, sep="/") if abstract is not None else {}
    for name in sorted(set(flat_abstract) | (set(expected) if abstract is not None else set())):
        # a caller's abstract of another model: shards were sliced from the file, truncating it silently
        if name not in flat_abstract:
            problems.append(f"tensor {name} is not among the parameters asked for")
        elif name not in st:
            problems.append(f"parameter {name} asked for is not in the file")
        elif tuple(flat_abstract[name].shape) != st.shape(name):
            problems.append(f"tensor {name} has shape {st.shape(name)}, the parameters asked for need "
                            f"{tuple(flat_abstract[name].shape)}")
    if problems:
        raise ValueError(f"{st.path} does not match {against}: " + "; ".join(problems))
    if abstract is None:
        flat = {name: np.array(st.get(name)) for name in expected}
    else:
        flat = {name: make_sharded(a, lambda idx, name=name: st.get(name)[idx]) for name, a in flat_abstract.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def load_bundle(directory: str, *, abstract=None, verify_checksums: bool = True):
    """(config, params) of a params bundle, after checking the manifest, every file's size and
    sha256 and every tensor's name, shape and dtype against the config's model.

    `abstract`: optional ShapeDtypeStructs with shardings (e.g. `Trainer.abstract_state.params`);
    params are then jax.Arrays read shard by shard, else numpy arrays. Any mismatch is a
    ValueError naming the file or tensor."""
    manifest = read_manifest(directory, verify_checksums=verify_checksums)
    config = read_config(directory)
    expected = _expected_tensors(model_lib.TransformerConfig.from_config(config.model))
    params = _read_tensors(os.path.join(directory, manifest["safetensors"]), expected, manifest["tensors"],
                           os.path.join(directory, "config.json"), abstract)
    return config, params


def load_bundle_vq(directory: str, *, verify_checksums: bool = True, batch_size: int = 64):
    """The bundle's VQ tokenizer (vq/model.safetensors + vq/vq_config.json, verified like the LM)."""
    from cm3leon_jax import vq_tokenizer
    manifest = read_manifest(directory, verify_checksums=verify_checksums, under=VQ_DIR)
    info = manifest.get("vq")
    if not info:
        raise FileNotFoundError(f"{os.path.join(directory, BUNDLE_JSON)}: the bundle holds no VQ tokenizer "
                                "(exported from text-only data?); pass a VQ workdir")
    vq_config = vq_tokenizer.load_vq_config(os.path.join(directory, VQ_DIR))
    abstract = vq_tokenizer.abstract_params(vq_config)
    expected = {name: (tuple(a.shape), np.dtype(a.dtype))
                for name, a in traverse_util.flatten_dict(abstract, sep="/").items()}
    params = _read_tensors(os.path.join(directory, info["safetensors"]), expected, info["tensors"],
                           os.path.join(directory, info["config"]), abstract)
    return vq_tokenizer.VQTokenizer(params, vq_config, batch_size)


def restore_params(model_dir: str, abstract, step: int | None = None):
    """(params, step) from a training workdir (orbax, latest or `step`) or a params bundle
    (verified safetensors): what generation and evaluation call, so both take either."""
    if not is_bundle(model_dir):
        return checkpointing.restore_params(model_dir, abstract, step)
    manifest = read_manifest(model_dir, verify_checksums=False)
    if step is not None and int(step) != int(manifest["step"]):
        raise ValueError(f"{model_dir} is a params bundle of step {manifest['step']}, not {step}")
    _, params = load_bundle(model_dir, abstract=abstract)
    return params, int(manifest["step"])


def load_vq_tokenizer(model_dir: str, vq_workdir: str | None = None, data_dir: str = ""):
    """(VQTokenizer, where it came from) for a model dir: `vq_workdir` when given, else the
    bundle's own vq/, else the model dir's own vq/ workdir (an imported checkpoint's), else the one
    the data was made with (DATA/ingest_report.json)."""
    from cm3leon_jax.vq_tokenizer import VQ_CONFIG_FILE, VQTokenizer
    if not vq_workdir and is_bundle(model_dir) and read_manifest(model_dir, verify_checksums=False).get("vq"):
        return load_bundle_vq(model_dir), os.path.join(model_dir, VQ_DIR)
    own_vq = workdir_io.join(model_dir, VQ_DIR)
    if not vq_workdir and not is_bundle(model_dir) and workdir_io.exists(workdir_io.join(own_vq, VQ_CONFIG_FILE)):
        return VQTokenizer.from_workdir(own_vq), own_vq
    vq_workdir = vq_workdir or data_vq_workdir(data_dir)
    if not vq_workdir:
        raise FileNotFoundError(f"no VQ tokenizer for {model_dir}: no vq/ in a params bundle and no ingest report "
                                f"in the data dir {data_dir!r} naming one; pass a VQ workdir (--vq_workdir)")
    return VQTokenizer.from_workdir(vq_workdir), vq_workdir


def _expected_tensors(model_cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    import jax.numpy as jnp
    from flax import linen as nn
    model = model_lib.Transformer(model_cfg)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    return {name: (tuple(x.shape), np.dtype(x.dtype)) for name, x in traverse_util.flatten_dict(shapes, sep="/").items()}


# ----------------------------------------------------------------------------- HF formats


def _chameleon_vq(workdir: str, config, vq_workdir: str | None):
    """(VQTokenizer or None, what cm3leon_export.json says about `model.vqmodel`) for hf-chameleon:
    `vq_workdir`, else the workdir's VQ as `load_vq_tokenizer` finds it. One Chameleon cannot hold
    (hf_vq.hf_config) or that does not fit the vocabulary is refused when named, skipped when found."""
    try:
        vq, source = load_vq_tokenizer(workdir, vq_workdir, config.data.get("data_dir", ""))
    except FileNotFoundError as e:
        if vq_workdir:
            raise
        return None, {"written": False, "reason": f"no VQ tokenizer: {e}"}
    try:
        hf_vq.hf_config(vq.config)
        vocab = _workdir_vocab(workdir)
        if vocab is not None:
            check_vq_fits_vocab(vq, vocab, source)
    except ValueError as e:
        if vq_workdir:
            raise
        logging.warning("model.vqmodel not written: %s", e)
        return None, {"written": False, "reason": str(e)}
    note = ("encoder and codebook (transformers' ChameleonVQVAE has no decoder)" +
            ("; l2-normalised codebook: same codes, latents before quantisation not normalised"
             if vq.config.l2_normalize_codes else ""))
    return vq, {"written": True, "source": os.path.abspath(source), "what": note}


def hf_ids_record(workdir: str) -> tuple[dict | None, list[str]]:
    """(the HF_IDS_JSON record, the workdirs read to find it). A checkpoint imported without
    --remap_vocab keeps its HF token ids in the embedding and head rows, and so does every run
    fine-tuned from it: init_from.json records are followed back (any depth) to a workdir holding
    the record. None: the chain reaches a workdir in our id layout: one holding our vocabulary
    (vocab/: trained on our data, imported with --remap_vocab) or starting from nothing. A workdir
    of the chain that is gone before that is an error: which ids its weights use cannot be told,
    and our ids in config.json would make transformers stop on the wrong token."""
    from cm3leon_jax import trainer as trainer_lib, vocab as vocab_lib
    chain = [workdir_io.resolve(workdir)]
    while True:
        path = workdir_io.join(chain[-1], HF_IDS_JSON)
        if workdir_io.exists(path):
            return workdir_io.read_format_json(path, HF_IDS_FORMAT, what="record of Hugging Face token ids"), chain
        if vocab_lib.Vocabulary.saved_in(workdir_io.join(chain[-1], VOCAB_DIR)):   # its ids are our layout's
            return None, chain
        record = trainer_lib.init_from_record(chain[-1])
        if record is None:
            return None, chain
        source = workdir_io.resolve(record["workdir"])
        if source in chain:
            raise ValueError(f"{workdir_io.join(chain[-1], trainer_lib.INIT_FROM_FILE)} leads back to {source}: "
                             f"the init_from chain {chain} loops")
        if not workdir_io.exists(workdir_io.join(source, "config.json")):
            raise FileNotFoundError(
                f"{workdir_io.join(chain[-1], trainer_lib.INIT_FROM_FILE)} says {chain[-1]} started from {source}, "
                f"which is gone (no config.json; chain {chain}): whether the weights hold a Hugging Face checkpoint's "
                f"token ids (imported without --remap_vocab: {HF_IDS_JSON} there) or ours cannot be told, so "
                f"config.json's pad/bos/eos ids cannot be written. Restore {source} (or point the record at a copy), "
                f"or copy the import's {HF_IDS_JSON} into {chain[0]}")
        chain.append(source)


def _check_hf_dtype(dtype: str) -> None:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: one of float32, bfloat16, float16")


def export_hf(workdir: str, out: str, fmt: str, step: int | None = None, dtype: str = "float32",
              vq_workdir: str | None = None) -> dict:
    """Writes OUT/config.json + OUT/model.safetensors for transformers; returns the HF config.
    hf-chameleon also writes our VQ encoder as `model.vqmodel` when there is one it can hold. Token
    ids are the imported checkpoint's where the weights keep them (`hf_ids_record`), else ours."""
    config = read_config(workdir)
    model_cfg = model_lib.TransformerConfig.from_config(config.model)
    hf_interop.check_exportable(model_cfg, fmt)  # refuse before reading anything
    _check_hf_dtype(dtype)
    vq, vq_note = _chameleon_vq(workdir, config, vq_workdir) if fmt == hf_interop.CHAMELEON else (None, None)
    ids_record, chain = hf_ids_record(workdir)
    _prepare_out(out)
    _, model_cfg, params, step = load_workdir_params(workdir, step)
    vocab = _workdir_vocab(workdir)
    vocabulary_map = None
    if fmt == hf_interop.CHAMELEON and vocab is not None and ids_record is None:
        vocabulary_map = hf_interop.our_vocabulary_map(vocab, model_cfg.vocab_size)
    hf_cfg = hf_interop.hf_config(model_cfg, fmt, vocabulary_map=vocabulary_map, dtype=dtype)
    token_ids = {"layout": "ours", "chain": chain, **{k: hf_cfg[k] for k in HF_ID_FIELDS[:3]}}
    if ids_record is not None:   # the weights keep the source checkpoint's ids: its config's, not ours
        for key in HF_ID_FIELDS:   # one the source did not set takes transformers' default, as it did there
            hf_cfg.pop(key, None)
        hf_cfg.update(ids_record["ids"])
        token_ids = {"layout": "hf", "chain": chain, "record": workdir_io.join(chain[-1], HF_IDS_JSON),
                     "hf_config": ids_record["source"],
                     **{k: v for k, v in ids_record["ids"].items() if k != "vocabulary_map"}}
    if vq is not None:
        hf_cfg["vq_config"] = hf_vq.hf_config(vq.config)
    entries = []
    for spec in hf_interop.tensor_specs(model_cfg, fmt):
        for layer in (range(model_cfg.num_layers) if spec.layered else [None]):
            if spec.ours is None:
                produce = lambda spec=spec: [hf_interop.constant(spec.kind, spec.hf_shape, np.float32)]
            else:
                def produce(spec=spec, layer=layer):
                    x = np.asarray(jax.device_get(hf_interop.layer_param(params, model_cfg, spec.ours, layer)))
                    return [hf_interop.to_hf(spec.kind, x, model_cfg)]
            entries.append((spec.name(layer), spec.hf_shape, dtype, produce))
    if vq is not None:
        entries += [(name, x.shape, dtype, lambda x=x: [x]) for name, x in hf_vq.hf_tensors(vq.params, vq.config)]
    sha = hf_interop.write_safetensors(os.path.join(out, "model.safetensors"), entries, metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "cm3leon_export.json"), "w", encoding="utf-8") as f:
        json.dump({"source_workdir": workdir_io.resolve(workdir), "step": step, "format": fmt, "dtype": dtype,
                   "model.safetensors_sha256": sha, "vqmodel": vq_note, "token_ids": token_ids,
                   "training_config": config.to_dict()}, f, indent=2, default=str)
        f.write("\n")
    if vq is not None:  # the image processor settings that feed transformers our pixels
        with open(os.path.join(out, hf_vq.PREPROCESSOR_CONFIG), "w", encoding="utf-8") as f:
            json.dump(hf_vq.preprocessor_config(vq.config), f, indent=2)
            f.write("\n")
    if vocab is not None:  # our SentencePiece vocabulary, for reference
        vocab.save(os.path.join(out, "cm3leon_vocab"))
    return hf_cfg


def export_hf_adapters(workdir: str, out: str, fmt: str, step: int | None = None, dtype: str = "float32",
                       base_model: str | None = None) -> dict:
    """A LoRA run's adapters alone as a PEFT LoRA adapter (OUT/adapter_config.json +
    OUT/adapter_model.safetensors) for the `fmt` export of the checkpoint it fine-tuned (its
    init_from.json): megabytes instead of the whole model, loaded in transformers with
    `PeftModel.from_pretrained(base, OUT)`. Returns the adapter config."""
    from cm3leon_jax import trainer as trainer_lib
    config = read_config(workdir)
    rank, alpha = int(config.model.get("lora_rank", 0)), float(config.model.get("lora_alpha", 0.0))
    if not rank:
        raise ValueError(f"--adapters_only: {workdir} is not a LoRA run (model.lora_rank = 0); export it whole")
    model_cfg = model_lib.TransformerConfig.from_config(config.model)
    hf_interop.check_exportable(model_cfg, fmt)
    base = trainer_lib.init_from_record(workdir)
    if base is None:
        raise ValueError(f"--adapters_only: {workdir} has no {trainer_lib.INIT_FROM_FILE}: its frozen weights are its "
                         "seed's random initialisation, which no checkpoint holds, so its adapters alone apply to "
                         "nothing; export it without --adapters_only (merged into the weights)")
    _check_hf_dtype(dtype)
    targets = lora.parse_targets(config.model.lora_targets)
    adapter_cfg = hf_interop.peft_config(model_cfg, fmt, rank, alpha, targets, base_model)
    _prepare_out(out)
    _, abstract = abstract_params(config)
    adapters, step = checkpointing.restore_params(workdir, lora.split(abstract)[0], step)

    def peft_tensor(spec, layer, which):   # PEFT's lora_A/lora_B of one layer, read from the (sharded) adapters
        name = lora.ADAPTER_PARAMS["AB".index(which)]
        x = hf_interop.layer_param(adapters, model_cfg, spec.path + (name,), layer)
        return hf_interop.adapter_to_hf(np.asarray(jax.device_get(x)), which)

    entries = []
    for spec in hf_interop.adapter_specs(model_cfg, fmt):
        if spec.target not in targets:
            continue
        for which in "AB":
            shape = peft_tensor(spec, 0, which).shape
            entries += [(spec.name(layer, which), shape, dtype, lambda spec=spec, layer=layer, which=which:
                         [peft_tensor(spec, layer, which)]) for layer in range(model_cfg.num_layers)]
    sha = hf_interop.write_safetensors(os.path.join(out, hf_interop.PEFT_WEIGHTS), entries, metadata={"format": "pt"})
    with open(os.path.join(out, hf_interop.PEFT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "cm3leon_export.json"), "w", encoding="utf-8") as f:
        json.dump({"source_workdir": workdir_io.resolve(workdir), "step": step, "format": fmt, "dtype": dtype,
                   "adapters_only": True, f"{hf_interop.PEFT_WEIGHTS}_sha256": sha,
                   "base": {"workdir": base["workdir"], "step": int(base["step"]),
                            "export": f"python -m cm3leon_jax.export --workdir {base['workdir']} --step {base['step']} "
                                      f"--format {fmt} --out BASE_DIR"},
                   "training_config": config.to_dict()}, f, indent=2, default=str)
        f.write("\n")
    return adapter_cfg


def export(workdir: str, out: str, fmt: str, step: int | None = None, dtype: str = "float32",
           vq_workdir: str | None = None, adapters_only: bool = False, base_model: str | None = None) -> Any:
    """`workdir` may be in a bucket (gs://); the bundle or HF checkpoint is written to a local `out`."""
    workdir, out = workdir_io.resolve(workdir), workdir_io.require_local(out, "--out")   # `~` expanded
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {FORMATS}")
    if (adapters_only or base_model) and fmt == "params":
        raise ValueError("--adapters_only/--base_model write a PEFT adapter for an hf-* format: add --format "
                         f"{' or '.join(hf_interop.FORMATS)}")
    if base_model and not adapters_only:
        raise ValueError("--base_model names the base of a PEFT adapter: it goes with --adapters_only")
    if fmt == "params":
        if dtype != "float32":
            raise ValueError("--dtype applies to the hf-* formats; params bundles keep the training dtype")
        return export_params(workdir, out, step, vq_workdir)
    if vq_workdir and (fmt != hf_interop.CHAMELEON or adapters_only):
        raise ValueError("--vq_workdir applies to params bundles and hf-chameleon; hf-opt and adapters hold the "
                         "language model only")
    if adapters_only:
        return export_hf_adapters(workdir, out, fmt, step, dtype, base_model)
    return export_hf(workdir, out, fmt, step, dtype, vq_workdir)


# ----------------------------------------------------------------------------- CLI


def _define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "training workdir (config.json + checkpoints/)", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_enum("format", "params", list(FORMATS), "what to write")
    flags.DEFINE_string("out", None, "output directory (new or empty)", required=True)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "tensor dtype of hf-* exports")
    flags.DEFINE_string("vq_workdir", None, "VQ tokenizer put in a params bundle or hf-chameleon vqmodel (default: the data's)")
    flags.DEFINE_bool("adapters_only", False, "a LoRA run's adapters alone, as a PEFT adapter for the hf-* export of "
                      "the checkpoint it fine-tuned (default: merged into the weights)")
    flags.DEFINE_string("base_model", None, "with --adapters_only: adapter_config.json's base_model_name_or_path "
                        "(the base's HF export directory or hub name)")
    return flags.FLAGS


def main(argv):
    del argv
    FLAGS = _FLAGS
    try:
        out = workdir_io.require_local(FLAGS.out, "--out")   # `~` expanded, as export() does
        export(FLAGS.workdir, out, FLAGS.format, FLAGS.step, FLAGS.dtype, FLAGS.vq_workdir,
               FLAGS.adapters_only, FLAGS.base_model)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"export failed: {e}") from None
    with open(os.path.join(out, BUNDLE_JSON if FLAGS.format == "params" else "cm3leon_export.json")) as f:
        step = json.load(f)["step"]
    print(json.dumps({"out": out, "format": FLAGS.format, "step": step}))


if __name__ == "__main__":
    from absl import app
    _FLAGS = _define_flags()
    app.run(main)
