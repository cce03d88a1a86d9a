"""Tiny VQ-GAN tokenizer for the shapes world: 64x64 -> 8x8 = 64 tokens from 512 codes.

Sized for bench/vq.py (15 minutes on a 2-core CPU). Three choices, each measured on this CPU
(held-out PSNR after 600 steps, batch 8; see WORKSPACE.md "VQ tokenizer"):
- No normalisation layers (norm="none"). GroupNorm's per-image statistics are dominated by the
  background, and every object came back grey for thousands of steps (21 dB after 15 minutes);
  LayerNorm did no better. Without norms the learning rate must stay near 1e-3.
- Euclidean code lookup (l2_normalize_codes=False): the cosine lookup collapsed to ~10 codes per
  batch once the norms were gone (17.5 dB at 600 steps against 22.2).
- A 4x4 space-to-depth stem (patch_size=4) and two levels of 32 and 64 channels: the wide
  convolutions at 16x16 and 8x8 run ~3x faster per step on a CPU than taming's 8-channel
  full-resolution ones, at the same parameter count.
Cosine decay over total_steps, sized to finish inside the bench's budget on a quiet machine
(its wall-clock stop guards a busy one). The GAN starts late (disc_start): the bench's budget
stays in the reconstruction phase, longer runs add it. Dead codes are re-seeded every 25 steps.
"""
from cm3leon_jax.config_defaults import vq_base_config


def get_config():
    config = vq_base_config()
    config.total_steps = 10_000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.sample_every_steps = 1000
    config.vq.update(image_size=64, patch_size=4, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                     attention_at_lowest=True, norm="none", codebook_size=512, code_dim=8,
                     l2_normalize_codes=False, embed_dim=64, num_groups=8)
    config.loss.update(l1_weight=1.0, l2_weight=1.0, disc_weight=0.1, disc_start=30_000, disc_channels=16,
                       disc_layers=2)
    config.optimizer.update(lr=1e-3, disc_lr=2e-4, b1=0.9, b2=0.95, warmup_steps=50, schedule="cosine",
                            end_lr_ratio=0.05)
    config.codebook.update(reseed_every_steps=25, dead_threshold=0.03, usage_decay=0.99, usage_window_steps=100)
    config.data.update(global_batch_size=8)
    return config
