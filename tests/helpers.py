"""Tiny configs, files and CLI runs shared by the tests."""
import json
import os
import subprocess
import sys

from cm3leon_jax.config_defaults import base_config, set_field


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(num_devices: int | None = 8, **extra: str) -> dict[str, str]:
    """This process's environment for a CLI subprocess: the repo put first on PYTHONPATH, not put in
    its place (packages may live there: a `pip install --target` directory), and `num_devices` fake
    CPU devices (None: no XLA_FLAGS at all, so the CLI chooses)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    env.pop("XLA_FLAGS", None)
    if num_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def run_cli(module: str, *args, num_devices: int | None = 1, timeout: float = 600, **extra_env: str):
    """`python -m module args` from the repo root; a failure shows the command's own stderr."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=cli_env(num_devices, **extra_env), timeout=timeout)
    assert proc.returncode == 0, f"python -m {module} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def tiny_config(**overrides):
    config = base_config()
    config.total_steps = 8
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.model.update(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=32)
    config.optimizer.update(peak_lr=1e-2, warmup_steps=2)
    config.data.update(seq_len=32, global_batch_size=8, min_doc_length=4, max_doc_length=20, num_documents=1000)
    for key, value in overrides.items():
        set_field(config, key, value)
    return config


CHAMELEON_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<sentinel:0>", "<sentinel:1>", "<racm3:break>", "<eoss>",
                      "<reserved08706>", "<image>"]


def chameleon_tokenizer_json(num_codes=16):
    """A byte-level BPE tokenizer.json (a few hundred merges, needs `tokenizers`) with Chameleon's
    special tokens and IMGIMG image tokens inside the BPE vocabulary, in a scrambled order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from cm3leon_jax import hf_interop, text_tokenizer
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(text_tokenizer.shapes_captions(200)), trainers.BpeTrainer(
        vocab_size=290, special_tokens=CHAMELEON_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    data = json.loads(bpe.to_str())
    n = len(data["model"]["vocab"])
    for code in range(num_codes):
        data["model"]["vocab"][hf_interop.image_token_name((code * 5) % num_codes)] = n + code
    return json.dumps(data)
