"""A minuscule run of every data stage, shared by the pipeline, retrieval-join, generation, SFT,
interop and end-to-end tests: the end-to-end runner's own stages (cm3leon_jax/e2e.py) up to the
LM: text tokenizer -> VQ tokenizer (16x16 -> 4x4 codes) -> ingestion -> retriever + ScaNN
neighbours -> a few LM steps. test_e2e.py runs the remaining stages on the same workdir."""
import ml_collections

from cm3leon_jax import config_defaults, e2e
from experiments import data_shapes, e2e_tiny, vq_tiny
from tests.helpers import tiny_config

LM_STEPS = 4


def vq_config():
    c = vq_tiny.get_config()
    c.total_steps = 4
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.sample_every_steps = 1000
    c.async_checkpointing = False
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.vq.update(image_size=16, patch_size=1, channels=8, channel_multipliers=(1, 2, 2), attention_at_lowest=False,
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
    c.model.update(vocab_size=vocab_size, max_length=512)  # room for retrieval-augmented prompts
    return c


def e2e_config():
    """experiments/e2e_tiny.py at minuscule size (data_dir and vocab_size are filled in by the runner)."""
    c = e2e_tiny.get_config()
    c.text_tokenizer.update(vocab_size=300, num_captions=2000)
    c.vq = vq_config()
    c.data = data_config("", "")
    c.retrieval.update(steps=10, batch_size=16, width=32, embed_dim=32, text_layers=1, image_layers=1, num_heads=2,
                       log_every=5)
    c.lm = lm_config("", 0, total_steps=LM_STEPS)
    c.lm.model.vocab_size = config_defaults.base_config().model.vocab_size   # the runner refuses any other
    c.evaluate.update(strategies=("topp_topk_cfg", "greedy"), num_prompts=2, num_samples=2, num_captions=2,
                      num_val_documents=4, neighbour_counts=(0, 1), num_vq_images=8, classifier_steps=3,
                      image_neighbours=1, cfg_scale=2.5, top_p=0.8)
    return c


def build(root, spm_model=None):
    """Runs the stages up to the LM in `root`; `spm_model` is unused (the runner trains its own)."""
    del spm_model
    pipeline = e2e.Pipeline(e2e_config(), str(root))
    pipeline.run(until="lm")
    paths = {name: pipeline.dirs[name] for name in ("text_tokenizer", "vq", "data", "lm")}
    paths["root"] = pipeline.workdir
    paths["vocab_size"] = int(pipeline.lm_config().model.vocab_size)
    return paths
