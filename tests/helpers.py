"""Tiny configs shared by the tests."""
from cm3leon_jax.config_defaults import base_config


def tiny_config(**overrides):
    config = base_config()
    config.total_steps = 8
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.model.update(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=32)
    config.optimizer.update(peak_lr=1e-2, warmup_steps=2)
    config.data.update(seq_len=32, global_batch_size=8, min_doc_length=4, max_doc_length=20, num_documents=1000)
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config
