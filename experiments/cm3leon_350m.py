"""CM3Leon-350M as in the paper (sizes and LR in experiments/cm3leon_sizes.py)."""
from experiments.cm3leon_sizes import paper_config


def get_config():
    return paper_config("350m")
