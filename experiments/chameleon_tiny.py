"""Chameleon's architecture (experiments/chameleon_7b.py) at CPU size: RMSNorm, SwiGLU, rotary,
QK-norm with learned per-head weight and bias, z-loss 1e-5. Exports as hf-chameleon."""
from cm3leon_jax.config_defaults import base_config
from experiments.chameleon_7b import chameleon_model


def get_config():
    config = base_config()
    config.total_steps = 300
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    config.eval_every_steps = 100
    config.model.update(vocab_size=512, num_layers=2, d_model=128, num_heads=4, d_ff=352, max_length=128)
    chameleon_model(config)
    config.optimizer.update(peak_lr=3e-3, warmup_steps=30)
    config.data.update(seq_len=128, global_batch_size=16)
    return config
