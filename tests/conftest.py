"""Shared fixtures (the 8-fake-device setup lives in the root conftest.py)."""
import pytest


@pytest.fixture(scope="session")
def tiny_spm_model(tmp_path_factory):
    """A small BPE model on shapes captions, trained once per test session."""
    from cm3leon_jax import text_tokenizer
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return text_tokenizer.train_sentencepiece(text_tokenizer.shapes_captions(2000), str(prefix), vocab_size=300)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_spm_model):
    """Every stage once, at minuscule size (see tests/pipeline_fixture.py)."""
    from tests import pipeline_fixture
    return pipeline_fixture.build(tmp_path_factory.mktemp("pipeline"), tiny_spm_model)
