"""The LM of `e2e_tiny.py` alone, on data an e2e run already prepared (tokenizers, documents, neighbours):

    python -m cm3leon_jax.train --config experiments/e2e_tiny_lm.py:workdirs/e2e/data --workdir DIR \
        [--config.total_steps=300 --config.model.positions=learned ...]

For LM ablations without redoing the upstream stages; with the same settings it is the e2e `lm`
stage exactly. The 300-step proxies behind e2e_tiny's positions / init / QK-norm choice ran this
way (see WORKSPACE.md).
"""
import os

from cm3leon_jax import e2e
from experiments import e2e_tiny


def get_config(data_dir: str = ""):
    if not data_dir or not os.path.isdir(data_dir):
        raise ValueError(f"experiments/e2e_tiny_lm.py needs the prepared data of an e2e run as its argument "
                         f"(--config experiments/e2e_tiny_lm.py:WORKDIR/data); got {data_dir!r}")
    return e2e.lm_config_for(e2e_tiny.get_config().lm, os.path.abspath(data_dir))
