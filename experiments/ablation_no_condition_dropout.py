"""Ablation: no condition dropout (the query caption is never replaced by <mask>); CFG then relies
on CM3 masking alone for its unconditional stream. Compare TopP+TopK+CFG with ablation_retrieval_k2
(the base run, which evaluates TopP+TopK+CFG and TopP only); TopP+CFG with ablation_decoding's."""
from experiments import e2e_tiny


def get_config():
    c = e2e_tiny.get_config()
    c.lm.data.condition_dropout_rate = 0.0
    c.evaluate.strategies = ("topp_topk_cfg", "topp_cfg", "topp")
    return c
