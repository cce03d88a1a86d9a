"""Instruction tuning with LoRA adapters on an int8 frozen base (QLoRA-style): sft_lora_tiny's
recipe with the frozen projection kernels held as int8 and a float32 scale per output channel.

    python -m cm3leon_jax.train --config experiments/sft_qlora_tiny.py:W/lm --workdir W/sft_qlora \\
        --config.data.data_dir=W/sft_data

The adapters train on the dequantized kernels, and `generate`, `sft_eval` and `export` merge them
into those. On the e2e LM the held-out loss matched LoRA on the float base (README, Measured).
"""
from experiments import sft_lora_tiny


def get_config(init_from: str = ""):
    config = sft_lora_tiny.get_config(init_from)
    config.model.lora_base_int8 = True
    return config
