"""Ablation: no retrieval augmentation in training (k = 0); compare validation losses with ablation_retrieval_k2."""
from experiments import e2e_tiny


def get_config():
    c = e2e_tiny.get_config()
    c.lm.data.num_neighbours = 0
    c.lm.data.seq_len = 128  # one document (~90 tokens) per example; keeps the batch count per step equal
    c.evaluate.neighbour_counts = (0,)
    return c
