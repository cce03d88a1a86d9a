"""Tiny VQ-GAN tokenizer for the shapes world: 64x64 -> 8x8 = 64 tokens from 512 codes.

Sized for bench/vq.py (15 minutes on a 2-core CPU): the full-resolution levels are only 8 and 16
channels wide (the 64x64 and 32x32 convolutions dominate the cost on a CPU), the width doubles
per level up to 64 at 8x8, where attention is cheap. Small batches (8) of many steps and a high
learning rate with beta1 0.9 converged fastest in short CPU runs; the customary GAN betas
(0.5, 0.9) and a start from step 0 were slower. Dead codes are re-seeded every 25 steps. The GAN
starts late (disc_start): the bench's budget stays in the reconstruction phase, longer runs add it.
"""
from cm3leon_jax.config_defaults import vq_base_config


def get_config():
    config = vq_base_config()
    config.total_steps = 50_000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.sample_every_steps = 1000
    config.vq.update(image_size=64, channels=8, channel_multipliers=(1, 2, 4, 8), num_res_blocks=1,
                     attention_at_lowest=True, codebook_size=512, code_dim=8, embed_dim=64, num_groups=8)
    config.loss.update(l1_weight=1.0, l2_weight=1.0, disc_weight=0.1, disc_start=30_000, disc_channels=16,
                       disc_layers=2)
    config.optimizer.update(lr=2e-3, disc_lr=2e-4, b1=0.9, b2=0.95, warmup_steps=50)
    config.codebook.update(reseed_every_steps=25, dead_threshold=0.03, usage_decay=0.99, usage_window_steps=100)
    config.data.update(global_batch_size=8)
    return config
