"""Every training config field with its default; experiment files override what they change.

Experiments are Python files with `get_config()` (big_vision style); any field can be overridden
on the command line as `--config.FIELD=VALUE` (e.g. `--config.model.num_layers=4`).
"""
from __future__ import annotations

import difflib
import sys

import ml_collections


def _parent(config: ml_collections.ConfigDict, dotted: str):
    *path, last = dotted.split(".")
    for part in path:   # every section on the way must exist and be a section ("seed.x" is no field either)
        if not isinstance(config, ml_collections.ConfigDict) or part not in config:
            raise KeyError(f"config has no field {dotted!r}")
        config = config[part]
    if not isinstance(config, ml_collections.ConfigDict) or last not in config:
        raise KeyError(f"config has no field {dotted!r}")
    return config, last


def get_field(config: ml_collections.ConfigDict, dotted: str):
    """`config.a.b` from "a.b"; an unknown field is a KeyError naming it."""
    parent, last = _parent(config, dotted)
    return parent[last]


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    """`config.a.b = value` from "a.b" (what `--config.a.b=` does on a command line); an unknown
    field is a KeyError naming it, never a new field nobody reads."""
    parent, last = _parent(config, dotted)
    parent[last] = value


def dotted_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field's dotted name ("optimizer.peak_lr", ...)."""
    names = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            names += dotted_fields(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flag parsing (`app.run(main, flags_parser=parse_flags)`), but a mistyped
    `--config.FIELD=` override is one line naming it and the nearest fields: ml_collections raised
    a bare `AttributeError: "'lerning_rate'"` from deep inside its parser."""
    from absl import app, flags
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        config = None
        for i, arg in enumerate(argv[1:], 1):   # the config file, loaded again without the overrides
            path = arg[len("--config="):] if arg.startswith("--config=") else (
                argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
            if path is not None:
                try:
                    config = flags.FLAGS["config"].parser.parse(path)
                except Exception:   # noqa: BLE001 - only the message's hint is lost
                    config = None
        message = f"an unknown --config field ({error})"
        if isinstance(config, ml_collections.ConfigDict):
            known = dotted_fields(config)
            for name in overrides:
                field = name[len("config."):]
                if field not in known:
                    near = difflib.get_close_matches(field, known, n=3, cutoff=0.6)
                    message = (f"--{name}: the config has no field {field!r}"
                               + (f"; did you mean {', '.join(near)}?" if near else ""))
                    break
        sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
        sys.exit(1)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    # Each step's global batch runs as this many microbatches, one after another, their gradients
    # summed before one optimizer update: the same update as one pass over the whole batch, with one
    # microbatch's activations in memory (the paper's ~2k-row batches on fewer devices).
    c.gradient_accumulation_steps = 1
    # Held-out loss every this many steps (and at the last), logged as eval_loss beside the training
    # loss: `eval_batches` fixed global batches of held-out documents built once at start-up (the
    # synthetic source: walks the training set never draws; cm3 and sft: the data's validation
    # split), scored with the training objective but no condition dropout. 0: off.
    c.eval_every_steps = 0
    c.eval_batches = 4
    # A profiler trace of steps profile_first_step .. + profile_steps - 1 under DIR/tensorboard
    # (TensorBoard's profile plugin, XProf, Perfetto). 0: off; step 1 compiles, so start later.
    c.profile_first_step = 0
    c.profile_steps = 3
    # A resumed run refuses a changed seed or data.* field (its saved data position would point into
    # another order); True resumes anyway, knowingly leaving the exact data order
    c.allow_data_change_on_resume = False

    # Device mesh: product must equal the device count; one axis may be -1 (= the rest).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # CM3Leon architecture defaults (see cm3leon_jax/model.py for every option).
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=512, num_layers=2, d_model=128, num_heads=4, d_ff=512, max_length=128,
        head_dim=0, positions="learned", rotary_base=10000.0, norm="layernorm", norm_placement="pre",
        qk_norm=False, qk_norm_params=False, mlp="relu", tie_embeddings=False, init_std=0.006, position_init_std=0.0002,
        dtype="float32", param_dtype="float32", remat_policy="none", scan_layers=True,
        attention_block_size=0,
        attention_impl="xla",  # "flash": Pallas flash kernel (TPU splash / GPU Triton), memory linear in seq_len
        # Low-rank adapters (LoRA, cm3leon_jax/lora.py): > 0 trains only rank-`lora_rank` updates of the
        # `lora_targets` projections, scaled by lora_alpha / lora_rank; everything else stays frozen
        lora_rank=0, lora_alpha=16.0, lora_targets="query,key,value,out,up,gate,down",
        # QLoRA-style: the frozen projection kernels held as int8 + a per-output-channel scale (a quarter
        # of float32's memory); the adapters train on the dequantized kernels
        lora_base_int8=False,
    ))

    # AdamW (Chameleon's betas/eps/decay/clip), linear warmup then `schedule`: "cosine" (the paper's) or
    # "linear" decay to end_lr_ratio * peak_lr; "wsd" holds the peak, then decays linearly over the
    # last decay_fraction of the steps; "constant".
    c.optimizer = ml_collections.ConfigDict(dict(
        peak_lr=3e-4, warmup_steps=100, end_lr_ratio=0.1, schedule="cosine", decay_fraction=0.2, b1=0.9, b2=0.95, eps=1e-5,
        weight_decay=0.1, grad_clip=1.0,   # global-norm clip; 0: none
        # A step whose gradients hold a NaN or an inf is skipped (no update, counted as skipped_steps);
        # more than this many in a row stop the run with an error while the parameters are still
        # finite. 0: no guard (a NaN reaches the parameters)
        skip_nonfinite=10,
    ))
    c.z_loss_weight = 0.0  # Chameleon: 1e-5
    # Fine-tuning: a pretrained LM workdir whose parameters (only) start a fresh run; the
    # optimizer starts fresh at step 0. Ignored once this run's workdir has its own checkpoint.
    c.init_from = ""

    # Data: documents -> packed rows [global_batch_size, seq_len]. num_streams independent
    # packing streams make the global batch identical for any process count (-1: one per row).
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", seq_len=128, global_batch_size=8, num_streams=-1,
        # Grain worker processes transforming and packing (0: in the trainer's process); batches
        # depend on it, so a run resumes with the same count
        worker_count=0,
        # source="synthetic": built-in Markov-chain token documents
        num_documents=100_000, min_doc_length=8, max_doc_length=64, source_seed=1234,
        # source="cm3": documents from `python -m data_pipeline.prepare` + their neighbour sidecar
        data_dir="", num_neighbours=3, condition_dropout_rate=0.1, cm3_masking=True, cm3_lambda=1.0,
        # share of documents whose whole caption is one CM3 span, after the image (teaches captioning)
        caption_span_rate=0.0,
        # more prepared datasets (same vocabulary, each with its own neighbours) whose train splits are
        # mixed with data_dir's: "DIR=WEIGHT,DIR=WEIGHT", data_dir weighing data_dir_weight. Shares
        # follow the weights; each dataset's held-out loss is logged (eval_loss_DIRNAME); generation
        # and export use data_dir alone
        mix_with="", data_dir_weight=1.0,
        # source="sft": documents from `python -m data_pipeline.sft_prepare` (data_dir), mixed by task
        # weight ("edit=2,vqa=1"; "" = equal) with the paper's 3x / 0.3x up/down-sampling limits; loss
        # on the output only ("output") or the full CM3 objective ("cm3"); InstructPix2Pix-style
        # condition dropout (text, image, both: each with this probability) for image outputs
        sft_task_weights="", sft_max_upsample=3.0, sft_min_downsample=0.3, sft_loss="output",
        sft_condition_dropout=0.05,
    ))
    return c


def vq_base_config() -> ml_collections.ConfigDict:
    """Every field of a VQ-GAN tokenizer run (`python -m cm3leon_jax.train_vq`) with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 10_000
    c.max_train_seconds = 0.0  # > 0: also stop (after a checkpoint) once this much wall-clock time has passed
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.profile_first_step = 0  # > 0: profiler trace of this step and the next profile_steps - 1 (as the LM's)
    c.profile_steps = 3
    c.allow_data_change_on_resume = False  # as the LM's: a resumed run refuses a changed seed or data.* field
    c.sample_every_steps = 1000  # PNG grid of held-out originals beside reconstructions, DIR/samples/
    c.num_sample_images = 8  # 0: no sample grids (nor val_psnr), and a folder holds none of its images out

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # cm3leon_jax.vqgan.VQGANConfig: every field.
    c.vq = ml_collections.ConfigDict(dict(
        image_size=64, in_channels=3, channels=64, channel_multipliers=(1, 2, 2, 4), num_res_blocks=2,
        attention_at_lowest=True, codebook_size=8192, code_dim=8, embed_dim=256, commitment_beta=0.25,
        l2_normalize_codes=True, num_groups=32, dtype="float32", patch_size=1, norm="group", local_encoder=False,
    ))

    # cm3leon_jax.vq_losses.VQLossConfig: every field.
    c.loss = ml_collections.ConfigDict(dict(
        l1_weight=1.0, l2_weight=1.0, edge_weight=0.0, perceptual_weight=1.0, perceptual_weights_path="", codebook_weight=1.0,
        disc_weight=0.5, disc_start=20_000, adaptive_weight=True, adaptive_weight_max=1e4, disc_channels=64,
        disc_layers=3, disc_norm="group",
    ))

    # Two AdamWs (generator = the VQGAN, discriminator); betas (0.5, 0.9) as taming/LlamaGen.
    # Linear warmup, then constant ("constant") or cosine to end_lr_ratio * lr ("cosine").
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, disc_lr=1e-4, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0, disc_weight_decay=0.0,
        warmup_steps=0, schedule="constant", end_lr_ratio=0.1, grad_clip=0.0,
        skip_nonfinite=10,  # as the LM's: NaN/inf updates of either network skipped, a longer streak stops the run
    ))

    # Codebook bookkeeping: usage EMA of each code's share of the tokens; every reseed_every_steps
    # the codes whose EMA share is below dead_threshold / codebook_size move onto the batch's worst-
    # quantized encoder outputs (0 turns re-seeding off). codebook_usage logs the share of codes
    # used at least once in the last usage_window_steps steps.
    c.codebook = ml_collections.ConfigDict(dict(
        usage_decay=0.99, reseed_every_steps=100, dead_threshold=0.03, reseed_noise=1e-3, usage_window_steps=100,
    ))

    # Images: the built-in shapes world, or a folder of PNG/JPEG (resized/center-cropped to vq.image_size).
    c.data = ml_collections.ConfigDict(dict(
        global_batch_size=16, image_dir="", val_image_dir="", num_threads=2,
        shapes_seed=0, min_objects=1, max_objects=3,
    ))
    return c
