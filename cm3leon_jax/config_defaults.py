"""Every training config field with its default; experiment files override what they change.

Experiments are Python files with `get_config()` (big_vision style); any field can be overridden
on the command line as `--config.FIELD=VALUE` (e.g. `--config.model.num_layers=4`).
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 3
    c.async_checkpointing = True

    # Device mesh: product must equal the device count; one axis may be -1 (= the rest).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # CM3Leon architecture defaults (see cm3leon_jax/model.py for every option).
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=512, num_layers=2, d_model=128, num_heads=4, d_ff=512, max_length=128,
        head_dim=0, positions="learned", rotary_base=10000.0, norm="layernorm", norm_placement="pre",
        qk_norm=False, mlp="relu", tie_embeddings=False, init_std=0.006, position_init_std=0.0002,
        dtype="float32", param_dtype="float32", remat_policy="none", scan_layers=True,
        attention_block_size=0,
    ))

    # AdamW (Chameleon's betas/eps/decay/clip), linear warmup then cosine decay.
    c.optimizer = ml_collections.ConfigDict(dict(
        peak_lr=3e-4, warmup_steps=100, end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-5,
        weight_decay=0.1, grad_clip=1.0,
    ))
    c.z_loss_weight = 0.0  # Chameleon: 1e-5

    # Data: documents -> packed rows [global_batch_size, seq_len]. num_streams independent
    # packing streams make the global batch identical for any process count (-1: one per row).
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", seq_len=128, global_batch_size=8, num_streams=-1,
        # synthetic source only
        num_documents=100_000, min_doc_length=8, max_doc_length=64, source_seed=1234,
    ))
    return c
