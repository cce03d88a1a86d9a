"""Chameleon-7B (Chameleon Team 2024, "Chameleon: Mixed-Modal Early-Fusion Foundation Models").

The architecture of transformers' `ChameleonForConditionalGeneration` (facebook/chameleon-7b), so
`python -m cm3leon_jax.export --format hf-chameleon` and `python -m cm3leon_jax.import_hf` hold it
exactly: 32 layers, d 4096, 32 heads (no GQA), SwiGLU FFN 11008, RMSNorm with weight, rotary
(theta 10000), QK-norm with a per-head learned weight and bias, pre-norm (the 34B model uses Swin
norm placement: `norm_placement="swin"`), untied head, 65,536-token vocabulary (BPE with the 8192
image codes inside it), 4096 context. Optimisation per the paper: AdamW (0.9, 0.95), eps 1e-5,
weight decay 0.1, peak lr 1e-4 with 4000 linear warmup steps (the decay is our cosine to 0.1x),
global clip 1.0, z-loss 1e-5, ~4.4T tokens. The paper's 7B also uses dropout 0.1, which our model
does not have.
"""
from cm3leon_jax.config_defaults import base_config

SEQ_LEN = 4096
GLOBAL_BATCH = 2048  # x 4096 ~ 8.4M tokens per step
TRAINING_TOKENS = 4.4e12


def chameleon_model(config) -> None:
    """The Chameleon choices (everything but the sizes) on config.model."""
    config.model.update(positions="rotary", rotary_base=10000.0, norm="rmsnorm", norm_placement="pre",
                        qk_norm=True, mlp="swiglu", tie_embeddings=False, head_dim=0)
    config.model.qk_norm_params = True  # QK-norm's learned per-head weight and bias (Chameleon's)
    config.z_loss_weight = 1e-5


def get_config():
    config = base_config()
    config.total_steps = int(TRAINING_TOKENS // (GLOBAL_BATCH * SEQ_LEN))
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.eval_every_steps, config.eval_batches = 1000, 2
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.model.update(vocab_size=65536, num_layers=32, d_model=4096, num_heads=32, d_ff=11008,
                        max_length=SEQ_LEN, dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch")
    chameleon_model(config)
    config.optimizer.update(peak_lr=1e-4, warmup_steps=4000, end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-5,
                            weight_decay=0.1, grad_clip=1.0)
    config.data.update(seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, max_doc_length=SEQ_LEN)
    return config
