"""Shared fixtures (the 8-fake-device setup lives in the root conftest.py)."""
import pytest


@pytest.fixture(scope="session")
def tiny_spm_model(tmp_path_factory):
    """A small BPE model on shapes captions, trained once per test session."""
    from cm3leon_jax import text_tokenizer
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return text_tokenizer.train_sentencepiece(text_tokenizer.shapes_captions(2000), str(prefix), vocab_size=300)
