"""The user path of issue 8: fine-tune a Chameleon/Anole-style transformers checkpoint with our SFT.

    import_hf --remap_vocab  ->  sft_prepare (the imported vocab/ and vq/)  ->
    train --config experiments/sft_tiny.py:IMPORTED  ->  generate --task caption / vqa

run in-process on a tiny random transformers Chameleon (byte-level BPE tokenizer.json with
Chameleon's specials and IMGIMG image tokens, 16x16 images, 64 codes per image). Checked: the loss
is finite and falls over a few steps, text tasks decode on the fine-tuned workdir, and image
outputs fail at once with the no-decoder error (transformers' ChameleonVQVAE has no decoder).
"""
import importlib.util
import json

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "tokenizers")),
    reason="needs the interop extra (torch, transformers, tokenizers)")


def test_finetune_imported_chameleon_with_sft(tmp_path):
    from cm3leon_jax import generate, import_hf, sft_generate, trainer, vqgan
    from data_pipeline import sft_prepare
    from experiments import data_sft_shapes, sft_tiny
    from tests import helpers
    from tests.test_hf_tokenizers import _chameleon_dir

    hf_dir = _chameleon_dir(tmp_path, helpers.chameleon_tokenizer_json(), max_length=160)
    imported = tmp_path / "imported"
    summary = import_hf.import_hf(str(hf_dir), str(imported), remap_vocab=True)
    assert summary["vocab"] == "vocab" and summary["vq"] == "vq"

    # sft_prepare on the imported vocabulary and VQ (as --config.vocab_dir / --config.vq_workdir)
    cfg = data_sft_shapes.get_config()
    cfg.update(image_size=16, tasks="caption,vqa", vocab_dir=str(imported / "vocab"), vq_workdir=str(imported / "vq"))
    cfg.num_documents.update(train=8, validation=2)
    vocab, encode = sft_prepare.load_vocab_and_encoder(cfg)
    data = tmp_path / "sft_data"
    report = sft_prepare.prepare_sft(cfg, str(data), vocab, encode)
    assert report["splits"]["train"]["kept"] == 16 and not report["splits"]["train"]["skipped"]

    # train --config experiments/sft_tiny.py:IMPORTED: the imported model, initialised from it
    config = sft_tiny.get_config(str(imported))
    assert config.init_from == str(imported) and config.model.vocab_size == 320 and config.data.seq_len == 160
    config.data.data_dir = str(data)
    config.update(total_steps=5, log_every_steps=1, checkpoint_every_steps=5)
    config.optimizer.update(peak_lr=3e-3, warmup_steps=1)
    config.data.update(global_batch_size=8, sft_condition_dropout=0.0)
    sft = tmp_path / "sft"
    trainer.train(config, str(sft))
    losses = [json.loads(line)["loss"] for line in (sft / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 5 and np.isfinite(losses).all() and losses[-1] < losses[0], losses

    # text outputs on the fine-tuned workdir (its vocab/; the VQ named by the data's report)
    gen = generate.Generator(str(sft))
    tasks = sft_generate.TaskGenerator(gen)
    image = np.random.RandomState(0).randint(0, 256, (16, 16, 3)).astype(np.uint8)
    for task, example in (("caption", {"image": image}), ("vqa", {"image": image, "question": "what color?"})):
        (text,) = tasks.run(task, [example], max_text_tokens=4)
        assert isinstance(text, str)
    # image outputs: the clear no-decoder error, before any sampling
    with pytest.raises(vqgan.NoDecoderError, match="no decoder"):
        tasks.run("text_to_image", [{"caption": "a red circle"}])
    with pytest.raises(vqgan.NoDecoderError, match="no decoder"):
        gen.text_to_image(["a red circle"], num_samples=1)
