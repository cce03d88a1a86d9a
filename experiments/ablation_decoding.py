"""Ablation: the decoding-strategy table on the base model (reused from the cache): greedy, TopP,
TopK, TopP+CFG, TopP+TopK+CFG, CD-K, and half TopP + half CD-K reranked by the retriever."""
from cm3leon_jax import evaluate
from experiments import e2e_tiny


def get_config():
    c = e2e_tiny.get_config()
    c.evaluate.strategies = tuple(evaluate.STRATEGIES)
    return c
