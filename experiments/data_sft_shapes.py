"""SFT ingestion of the shapes world's instruction tasks: `python -m data_pipeline.sft_prepare`."""
from experiments import data_shapes


def get_config():
    c = data_shapes.get_config()     # image size, limits, tokenizers, jsonl options as for pretraining data
    c.num_documents.update({"train": 2000, "validation": 50})  # per task
    c.tasks = "text_to_image,caption,vqa,edit,control,segment,infill"
    c.max_document_length = 2300     # an edit holds two images
    c.vocab_dir = ""                 # the pretrained run's vocab/ (exact same ids); else spm_model + vq_workdir
    return c
