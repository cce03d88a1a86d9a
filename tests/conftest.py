"""Shared fixtures (the 8-fake-device setup lives in the root conftest.py)."""
import pytest


@pytest.fixture(scope="session")
def tiny_spm_model(tmp_path_factory):
    """A small BPE model on shapes captions, trained once per test session."""
    from cm3leon_jax import text_tokenizer
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return text_tokenizer.train_sentencepiece(text_tokenizer.shapes_captions(2000), str(prefix), vocab_size=300)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, worker_id):
    """Every stage once, at minuscule size (see tests/pipeline_fixture.py), for the whole session:
    the first pytest-xdist worker that needs it builds it (~70 s on 2 cores) under a file lock in
    the session's shared temporary directory, and the others read it. Tests only read it (or copy
    it), and the build is deterministic, so which worker built it changes nothing."""
    import json

    import filelock

    from tests import pipeline_fixture
    if worker_id == "master":   # not under xdist
        return pipeline_fixture.build(tmp_path_factory.mktemp("pipeline"))
    shared = tmp_path_factory.getbasetemp().parent
    paths_file = shared / "tiny_pipeline.json"
    with filelock.FileLock(str(paths_file) + ".lock"):
        if not paths_file.exists():
            paths_file.write_text(json.dumps(pipeline_fixture.build(shared / "tiny_pipeline")))
        return json.loads(paths_file.read_text())
