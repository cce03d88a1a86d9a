"""Tiny configs and files shared by the tests."""
import json

from cm3leon_jax.config_defaults import base_config, set_field


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
