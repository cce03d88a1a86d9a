"""Instruction tuning (SFT) of a tiny CM3Leon on the shapes-world tasks:

    python -m cm3leon_jax.train --config experiments/sft_tiny.py --workdir W/sft \\
        --config.init_from=W/lm --config.data.data_dir=W/sft_data --config.model.vocab_size=N

The model must be the pretrained one (tiny_cpu's, with max_length 256: an edit or infilling
example holds two 64-token images, ~200 tokens). The paper's SFT recipe relative to its
pretraining: peak LR 5e-5 vs 1.2e-4 (x0.42), warmup 150 vs 1500 steps (x0.1); those ratios are
applied to tiny_cpu's 3e-3 and 30. The paper's 2M-token batches (a quarter of pretraining's) and
~30B tokens (~1% of pretraining) do not transfer to a 0.75M-parameter model that has to learn
seven new tasks: it keeps 8 rows of 256 tokens and trains for as long as the tasks need.

Any other pretrained model (an `import_hf` workdir of a Chameleon/Anole or OPT checkpoint, or a
run with another architecture) is named as the config's argument, which takes that workdir's model
section (architecture and vocab_size) and its data.seq_len (an import's: min(max_length, 4096);
Chameleon's 1024-token images need it) and sets init_from to it:

    python -m cm3leon_jax.train --config experiments/sft_tiny.py:IMPORTED --workdir W/sft \\
        --config.data.data_dir=W/sft_data
"""
from cm3leon_jax import config_defaults
from experiments import tiny_cpu


def get_config(init_from: str = ""):
    config = tiny_cpu.get_config()
    config.total_steps = 600
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    config.init_from = ""  # the pretrained workdir (--config.init_from=..., or the config argument)
    config.model.update(max_length=256)
    config.optimizer.update(peak_lr=3e-3 * 5e-5 / 1.2e-4, warmup_steps=3, end_lr_ratio=0.1)
    config.data.update(source="sft", data_dir="", seq_len=256, global_batch_size=8, sft_loss="output",
                       sft_task_weights="", sft_condition_dropout=0.05)
    if init_from:
        from cm3leon_jax import trainer
        config.init_from = init_from
        pretrained = trainer.pretrained_config(init_from)
        config.model = config_defaults.base_config().model   # defaults for fields the pretrained run predates
        config.model.update(pretrained["model"])
        # the architecture only: a LoRA run's adapter settings would turn this full fine-tuning into
        # LoRA (its weights come merged); sft_lora_tiny sets its own
        config.model.update({k: config_defaults.base_config().model[k] for k in trainer._ADAPTER_MODEL_FIELDS})
        seq_len = int(pretrained.get("data", {}).get("seq_len") or config.data.seq_len)
        config.data.seq_len = min(seq_len, int(config.model.max_length))
    return config
