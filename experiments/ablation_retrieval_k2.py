"""Ablation baseline: the end-to-end tiny run, trained with k = 2 retrieved neighbours per document."""
from experiments import e2e_tiny


def get_config():
    return e2e_tiny.get_config()
