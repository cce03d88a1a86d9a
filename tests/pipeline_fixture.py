"""A minuscule run of every data stage, shared by the pipeline, retrieval-join and generation tests:
VQ tokenizer (16x16 -> 4x4 codes) -> ingestion -> retriever + ScaNN neighbours -> a few LM steps."""
import os

import ml_collections

from cm3leon_jax import trainer, train_vq
from cm3leon_jax import vocab as vocab_lib
from data_pipeline import index, prepare
from experiments import data_shapes, vq_tiny
from tests.helpers import tiny_config


def vq_config():
    c = vq_tiny.get_config()
    c.total_steps = 4
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.sample_every_steps = 1000
    c.async_checkpointing = False
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.vq.update(image_size=16, channels=8, channel_multipliers=(1, 2, 2), attention_at_lowest=False,
                codebook_size=32, code_dim=4, embed_dim=8, num_groups=4)
    c.loss.update(disc_start=1000)
    c.data.update(global_batch_size=8)
    return c


def data_config(spm_model, vq_workdir, **overrides):
    c = data_shapes.get_config()
    c.num_documents = ml_collections.ConfigDict({"train": 96, "validation": 16})
    c.update(image_size=16, min_image_size=8, encode_batch_size=32, spm_model=spm_model, vq_workdir=vq_workdir,
             log_every=1000, **overrides)
    return c


def lm_config(data_dir, vocab_size, **overrides):
    c = tiny_config(**overrides)
    c.data.update(source="cm3", data_dir=data_dir, seq_len=64, num_neighbours=2)
    c.model.update(vocab_size=vocab_size, max_length=256)  # room for retrieval-augmented prompts
    return c


def build(root, spm_model):
    paths = {name: os.path.join(str(root), name) for name in ("vq", "data", "lm")}
    train_vq.train(vq_config(), paths["vq"])
    cfg = data_config(spm_model, paths["vq"])
    vocab, encode = prepare.load_vocab_and_encoder(cfg)
    prepare.prepare(cfg, paths["data"], vocab, encode)
    index.build(paths["data"], steps=10, batch_size=16, width=32, embed_dim=32, text_layers=1, image_layers=1,
                num_heads=2, log_every=5)
    vocab = vocab_lib.Vocabulary.load(os.path.join(paths["data"], prepare.VOCAB_DIR))
    paths["vocab_size"] = vocab.padded_size(8)
    trainer.train(lm_config(paths["data"], paths["vocab_size"], total_steps=4), paths["lm"])
    return paths
