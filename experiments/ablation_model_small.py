"""Ablation: model size, small (6 x 384) against the tiny base (4 x 192), same data and steps."""
from experiments import e2e_tiny


def get_config():
    c = e2e_tiny.get_config()
    c.lm.model.update(num_layers=6, d_model=384, num_heads=6, d_ff=1536)
    c.lm.optimizer.peak_lr = 1e-3
    return c
