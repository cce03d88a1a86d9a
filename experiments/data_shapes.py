"""Ingestion of the built-in shapes world (the default data): `python -m data_pipeline.prepare`."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.source = "shapes"              # shapes | folder | jsonl | tfds
    c.seed = 0
    c.num_documents = ml_collections.ConfigDict({"train": 20_000, "validation": 500})
    c.image_size = 64                # must match the VQ tokenizer's image size
    c.min_image_size = 16            # smaller images are skipped (counted as image_too_small)
    c.max_document_length = 1100     # longer documents are skipped (counted as document_too_long)
    c.validation_fraction = 0.02     # folder / jsonl sources: share of files hashed into validation
    c.encode_batch_size = 64
    c.decode_threads = 0             # image decoding threads, running ahead of the VQ encoder (0: min(8, cores))
    c.log_every = 2000
    c.spm_model = ""                 # SentencePiece model (python -m cm3leon_jax.text_tokenizer)
    c.vq_workdir = ""                # VQ tokenizer workdir (python -m cm3leon_jax.train_vq)
    c.num_sentinels = 16
    # other sources
    c.folder = ""
    c.jsonl = ""
    c.tfds_name = ""
    c.tfds_data_dir = ""
    c.tfds_train_split = "train"
    c.tfds_validation_split = "validation"
    c.tfds_image_key = "image"       # "": a text-only TFDS dataset (needs text_only)
    c.tfds_text_key = "text"
    # Text-only documents (Chameleon's text data, to mix with image-text data: the LM's
    # data.mix_with): jsonl rows without "image" (or null) and tfds_image_key="" become documents of
    # text alone. Off: such rows are skipped and counted as no_image
    c.text_only = False
    return c
