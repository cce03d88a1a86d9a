"""CM3Leon's image tokenizer (Make-A-Scene VQ-GAN): 256x256 -> 32x32 = 1024 tokens from 8192 codes.

8x downsampling over four levels (channel multipliers 1,1,2,4 on a 128-wide base), two residual
blocks per level, attention at 32x32, LlamaGen's 8-d l2-normalised lookup, bf16 compute (fp32
params), PatchGAN from step 20k. An accelerator run: batch 128 over the mesh's data axis. Train on
your own images with --config.data.image_dir=DIR (PNG/JPEG, center-cropped to 256); without it,
the built-in shapes world at 256x256. Perceptual loss: --config.loss.perceptual_weights_path=FILE.
"""
from cm3leon_jax.config_defaults import vq_base_config


def get_config():
    config = vq_base_config()
    config.total_steps = 200_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5000
    config.sample_every_steps = 2500
    config.vq.update(image_size=256, channels=128, channel_multipliers=(1, 1, 2, 4), num_res_blocks=2,
                     attention_at_lowest=True, codebook_size=8192, code_dim=8, embed_dim=256, num_groups=32,
                     dtype="bfloat16")
    config.loss.update(l1_weight=1.0, l2_weight=1.0, perceptual_weight=1.0, disc_weight=0.5, disc_start=20_000,
                       disc_channels=64, disc_layers=3)
    config.optimizer.update(lr=1e-4, disc_lr=1e-4, b1=0.5, b2=0.9, warmup_steps=1000, weight_decay=0.0)
    config.codebook.update(reseed_every_steps=500, dead_threshold=0.03, usage_decay=0.99, usage_window_steps=500)
    config.data.update(global_batch_size=128, num_threads=16)
    return config
