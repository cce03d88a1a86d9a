"""Instruction tuning with LoRA adapters: sft_tiny's recipe with the model frozen and rank-16
adapters on every projection trained instead (cm3leon_jax/lora.py).

    python -m cm3leon_jax.train --config experiments/sft_lora_tiny.py:W/lm --workdir W/sft_lora \\
        --config.data.data_dir=W/sft_data

The argument is the pretrained workdir (its model section and seq_len, as sft_tiny's argument).
Adapters learn from a zero start (B = 0), so they take a peak LR ~8x full fine-tuning's (LoRA's
usual 10x rule), and no weight decay (it would pull the update towards nothing, not towards the
pretrained weights). Adam's state then covers the adapters only; `export`, `generate` and
`sft_eval` merge them into the kernels, so the tuned model decodes at the base model's cost.
"""
from experiments import sft_tiny


def get_config(init_from: str = ""):
    config = sft_tiny.get_config(init_from)
    config.model.update(lora_rank=16, lora_alpha=16.0, lora_targets="query,key,value,out,up,gate,down")
    config.optimizer.update(peak_lr=1e-2, weight_decay=0.0)
    return config
