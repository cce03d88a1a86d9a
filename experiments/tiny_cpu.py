"""Tiny CM3Leon that trains in a few minutes on a laptop CPU (the README's synthetic-data training
command; on the shapes data raise data.seq_len and model.max_length to
512 to leave its 3 neighbours room)."""
from cm3leon_jax.config_defaults import base_config


def get_config():
    config = base_config()
    config.total_steps = 300
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    config.eval_every_steps = 100   # held-out loss (eval_loss) on 4 fixed batches of unseen documents
    config.model.update(vocab_size=512, num_layers=2, d_model=128, num_heads=4, d_ff=512, max_length=128)
    config.optimizer.update(peak_lr=3e-3, warmup_steps=30)
    config.data.update(seq_len=128, global_batch_size=16)
    return config
