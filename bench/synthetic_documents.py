"""Documents for the data benches: shapes-world captions (a BPE model trained on them) and random
VQ codes, written through `prepare.prepare`'s TFDS builder into ArrayRecord, the real ingestion
path. No trained VQ is needed: the benches time what happens to documents, not their pixels."""
from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from cm3leon_jax import text_tokenizer, vocab as vocab_lib
from data_pipeline import prepare
from experiments import data_shapes


def ingest_random_code_documents(data_dir: str, num_documents: int, image_side: int, num_image_codes: int,
                                 seed: int) -> vocab_lib.Vocabulary:
    """Writes `num_documents` train documents (no validation split) into data_dir; returns the vocabulary."""
    t0 = time.perf_counter()
    spm = text_tokenizer.train_sentencepiece(text_tokenizer.shapes_captions(5000, seed=seed),
                                             os.path.join(data_dir, "spm", "spm"), vocab_size=1000)
    vocab = vocab_lib.Vocabulary(text_tokenizer.TextTokenizer(spm), num_image_codes=num_image_codes,
                                 image_tokens_per_image=image_side * image_side)
    rng = np.random.default_rng(seed)

    def random_codes(images: np.ndarray) -> np.ndarray:
        return rng.integers(0, num_image_codes, (len(images), image_side, image_side), dtype=np.int32)

    cfg = data_shapes.get_config()
    cfg.num_documents = ml_collections.ConfigDict({"train": num_documents, "validation": 0})
    cfg.update(image_size=16, min_image_size=16, encode_batch_size=256, seed=seed, log_every=10 ** 9,
               max_document_length=10 ** 6)
    prepare.prepare(cfg, data_dir, vocab, random_codes)
    print(f"ingested {num_documents} documents in {time.perf_counter() - t0:.1f}s", flush=True)
    return vocab
