"""Workdirs in an object store (gs://): paths, metrics, TensorBoard events, vocabulary, resumed training.

The bucket is fsspec's in-memory filesystem registered as the `gcs` protocol (what etils.epath uses
for gs:// when gcsfs is installed), so every write goes through the same epath/fsspec calls it
would make against GCS. Orbax writes gs:// through tensorstore's own GCS driver, which this
machine cannot reach: the resume test maps the checkpoint directory to a local one and nothing
else.
"""
import importlib
import json
import os
import struct

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from tensorboardX.proto import event_pb2

from cm3leon_jax import checkpointing, metrics, trainer, workdir_io
from cm3leon_jax import text_tokenizer as tt
from cm3leon_jax import vocab as vb
from tests.helpers import tiny_config


class _MemoryBucket(MemoryFileSystem):
    protocol = ("gcs", "gs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs's option
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return super()._strip_protocol(path)


@pytest.fixture
def bucket(monkeypatch):
    """gs:// served from memory; returns {object path: bytes} of what was written."""
    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.setitem(registry, "gcs", _MemoryBucket)
    monkeypatch.setitem(registry, "gs", _MemoryBucket)
    _MemoryBucket.store.clear()
    _MemoryBucket.pseudo_dirs[:] = [""]
    _MemoryBucket.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield lambda: {path.lstrip("/"): f.getvalue() for path, f in _MemoryBucket.store.items()}
    _MemoryBucket.store.clear()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _scalars(event_file: bytes) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a TFRecord-framed event file."""
    out, offset = [], 0
    while offset < len(event_file):
        (length,) = struct.unpack("<Q", event_file[offset:offset + 8])
        event = event_pb2.Event.FromString(event_file[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def _records(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def test_paths_keep_urls_and_reject_unknown_schemes(tmp_path):
    assert workdir_io.resolve("gs://b/run") == "gs://b/run"
    assert workdir_io.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
    assert workdir_io.resolve("rel/dir") == os.path.abspath("rel/dir")
    assert workdir_io.join(str(tmp_path), "a") == os.path.join(str(tmp_path), "a")
    assert not workdir_io.is_remote(str(tmp_path))
    with pytest.raises(ValueError, match="only local paths"):
        workdir_io.resolve("ftp://host/run")
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # without a backend, the start-up check names the package to install
        with pytest.raises(ImportError, match="gcsfs"):
            workdir_io.check_backend("gs://b/run")
    workdir_io.check_backend(str(tmp_path))


def test_local_paths_expand_a_tilde_the_shell_left(tmp_path, monkeypatch):
    """`--workdir=~/run` reaches absl unexpanded: abspath alone made it ./~/run under the cwd."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert workdir_io.resolve("~/run") == str(tmp_path / "run")
    assert workdir_io.require_local("~/data", "--data") == str(tmp_path / "data")
    assert workdir_io.resolve("gs://b/~/run") == "gs://b/~/run"


def test_metrics_logger_uploads_on_flush_and_keeps_records_on_reopen(bucket):
    logger = metrics.MetricsLogger("gs://b/run", enabled=True, remote_flush_seconds=3600)
    for step in (1, 2, 3):
        logger.write(step, {"loss": 1.0 / step})
    assert "b/run/metrics.jsonl" not in bucket()  # held in memory until a flush (objects cannot be appended to)
    logger.flush()
    assert [r["step"] for r in _records(bucket()["b/run/metrics.jsonl"])] == [1, 2, 3]
    logger.write(4, {"loss": 0.25})
    logger.close()
    files = bucket()
    assert [r["loss"] for r in _records(files["b/run/metrics.jsonl"])] == [1.0, 0.5, 1.0 / 3, 0.25]
    events = [k for k in files if k.startswith("b/run/tensorboard/events.out.tfevents")]
    assert len(events) == 1
    assert [(s, t) for s, t, _ in _scalars(files[events[0]])] == [(1, "loss"), (2, "loss"), (3, "loss"), (4, "loss")]
    # a resumed run reopens the object and appends after what is there
    reopened = metrics.MetricsLogger("gs://b/run", enabled=True, remote_flush_seconds=0)
    reopened.write(5, {"loss": 0.2})
    assert [r["step"] for r in _records(bucket()["b/run/metrics.jsonl"])] == [1, 2, 3, 4, 5]
    reopened.close()


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_format_tagged_json_is_checked_up_front(where, tmp_path, bucket):
    root = str(tmp_path) if where == "local" else "gs://b/run"
    path = workdir_io.join(root, "thing.json")
    with pytest.raises(FileNotFoundError, match="thing.json not found: no saved thing there .make one."):
        workdir_io.read_format_json(path, "thing/1", what="saved thing", hint="make one")
    workdir_io.write_text(path, json.dumps({"format": "thing/1", "size": 3}))
    assert workdir_io.read_format_json(path, "thing/1", what="saved thing") == {"format": "thing/1", "size": 3}
    with pytest.raises(ValueError, match="format 'thing/1', expected 'thing/2': not a saved thing this version"):
        workdir_io.read_format_json(path, "thing/2", what="saved thing")
    for bad, message in [('{"format": "thing/1", "si', "corrupted saved thing"), ("[1, 2]", "format 'a JSON list'"),
                         (b"\xff\xfe{}", "corrupted saved thing")]:
        workdir_io.write_bytes(path, bad if isinstance(bad, bytes) else bad.encode())
        with pytest.raises(ValueError, match=message):
            workdir_io.read_format_json(path, "thing/1", what="saved thing")


def test_vocabulary_saves_to_and_loads_from_a_bucket(bucket, tiny_spm_model):
    vocab = vb.Vocabulary(tt.TextTokenizer(tiny_spm_model), 64, 16, num_sentinels=4)
    vocab.save("gs://b/run/vocab")
    assert {"b/run/vocab/vocab.json", "b/run/vocab/spm.model"} <= set(bucket())
    loaded = vb.Vocabulary.load("gs://b/run/vocab", expected_fingerprint=vocab.fingerprint)
    assert loaded.layout() == vocab.layout()
    text = "a small red circle at the top left"
    assert loaded.text_tokenizer.encode(text) == vocab.text_tokenizer.encode(text)


def test_training_in_a_bucket_writes_there_and_resumes(bucket, tmp_path, monkeypatch):
    local_checkpoints = tmp_path / "checkpoints"
    real_manager = checkpointing.ocp.CheckpointManager

    def manager_on_local_disk(directory, *args, **kwargs):  # tensorstore's GCS driver is out of reach here
        if directory.startswith(str(tmp_path / "bundle")):  # the export's own local copy
            return real_manager(directory, *args, **kwargs)
        assert directory == "gs://b/run/checkpoints"  # not ./gs:/b/run/checkpoints
        return real_manager(str(local_checkpoints), *args, **kwargs)

    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", manager_on_local_disk)
    monkeypatch.chdir(tmp_path)
    trainer.train(tiny_config(total_steps=4, checkpoint_every_steps=2), "gs://b/run")
    files = bucket()
    assert json.loads(files["b/run/config.json"])["total_steps"] == 4
    assert [r["step"] for r in _records(files["b/run/metrics.jsonl"])] == [2, 4]
    assert any(k.startswith("b/run/tensorboard/events.out.tfevents") for k in files)
    assert {"2", "4"} <= set(os.listdir(local_checkpoints))
    assert not os.path.exists(tmp_path / "gs:")  # nothing landed in a local directory named after the URL

    trainer.train(tiny_config(total_steps=6, checkpoint_every_steps=2), "gs://b/run")
    files = bucket()
    assert [r["step"] for r in _records(files["b/run/metrics.jsonl"])] == [2, 4, 6]
    assert json.loads(files["b/run/config.json"])["total_steps"] == 6
    assert "6" in os.listdir(local_checkpoints)

    # a params bundle exported from the bucket run, to a local directory
    from cm3leon_jax import export
    manifest = export.export("gs://b/run", str(tmp_path / "bundle"), "params")
    assert manifest["source_workdir"] == "gs://b/run" and manifest["step"] == 6
    assert (tmp_path / "bundle" / "config.json").read_bytes() == files["b/run/config.json"]
    with pytest.raises(ValueError, match="local or mounted"):
        export.export("gs://b/run", "gs://b/bundle", "params")


def test_vq_config_and_sample_grids_in_a_bucket(bucket):
    import io

    import numpy as np
    from PIL import Image

    from cm3leon_jax import train_vq, vqgan, vq_tokenizer
    config = vqgan.VQGANConfig(image_size=16, patch_size=4, channel_multipliers=(1, 2), codebook_size=32)
    vq_tokenizer.save_vq_config("gs://b/vq", config)
    assert vq_tokenizer.load_vq_config("gs://b/vq") == config
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    path = train_vq.write_sample_grid("gs://b/vq", 7, images, images[::-1])
    assert path == "gs://b/vq/samples/step_000007.png"
    grid = np.asarray(Image.open(io.BytesIO(bucket()["b/vq/samples/step_000007.png"])))
    np.testing.assert_array_equal(grid, train_vq.sample_grid(images, images[::-1]))


def test_evaluating_a_bucket_workdir_needs_a_local_report_dir(bucket):
    from cm3leon_jax import evaluate
    with pytest.raises(ValueError, match="local --out"):  # checked before any model is loaded
        evaluate.evaluate("gs://b/run")


def test_stages_that_read_local_files_refuse_a_bucket_up_front():
    from cm3leon_jax import ablate, e2e
    from experiments import e2e_tiny
    with pytest.raises(ValueError, match="local or mounted"):
        e2e.Pipeline(e2e_tiny.get_config(), "gs://b/e2e")
    with pytest.raises(ValueError, match="local or mounted"):
        ablate.run("gs://b/ablations", [])
    from cm3leon_jax import import_hf
    with pytest.raises(ValueError, match="local or mounted"):
        import_hf.import_hf("/nonexistent/hf", "gs://b/imported")
    assert workdir_io.require_local("rel", "--out") == os.path.abspath("rel")


def test_a_directory_in_a_bucket_copies_to_a_local_one(bucket, tmp_path):
    # import_hf's PEFT import copied --base's vocab/ and vq/ only when os.path.isdir, never true of a URL:
    # a bucket base gave a run Generator could not load, without a word
    files = {"vocab/vocab.json": b"{}", "vocab/spm.model": b"\x00\x01", "vocab/deep/more.txt": b"x"}
    for name, data in files.items():
        workdir_io.write_bytes(f"gs://b/base/{name}", data)
    assert workdir_io.copy_tree("gs://b/base/vocab", str(tmp_path / "vocab"))
    copied = {os.path.relpath(os.path.join(d, f), tmp_path): open(os.path.join(d, f), "rb").read()
              for d, _, names in os.walk(tmp_path) for f in names}
    assert copied == {name.replace("/", os.sep): data for name, data in files.items()}
    assert not workdir_io.copy_tree("gs://b/base/vq", str(tmp_path / "vq")) and not os.path.exists(tmp_path / "vq")


def test_a_generator_reads_its_model_from_a_bucket(bucket, tiny_pipeline, monkeypatch):
    from cm3leon_jax import generate, sampling
    local = tiny_pipeline["lm"]
    for root, _, names in os.walk(local):
        rel = os.path.relpath(root, local)
        if rel.split(os.sep)[0] == "checkpoints":
            continue
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                workdir_io.write_bytes(workdir_io.join("gs://b/lm", *([] if rel == "." else rel.split(os.sep)), name),
                                       f.read())
    real_manager = checkpointing.ocp.CheckpointManager

    opened = []

    def manager_on_local_disk(directory, *args, **kwargs):  # tensorstore's GCS driver is out of reach here
        opened.append(directory)
        if directory == "gs://b/lm/checkpoints":
            directory = os.path.join(local, "checkpoints")
        return real_manager(directory, *args, **kwargs)

    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", manager_on_local_disk)
    remote = generate.Generator("gs://b/lm")
    assert "gs://b/lm/checkpoints" in opened  # the LM came from the bucket (the VQ from the data's local workdir)
    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", real_manager)
    here = generate.Generator(local)
    assert remote.step == here.step and remote.vocab.fingerprint == here.vocab.fingerprint
    config = sampling.SamplingConfig(top_p=0.9, cfg_scale=3.0)
    a = remote.text_to_image(["a small red circle at the top left"], num_samples=2, config=config, seed=3)
    b = here.text_to_image(["a small red circle at the top left"], num_samples=2, config=config, seed=3)
    np.testing.assert_array_equal(a[0].codes, b[0].codes)


def test_npy_rows_that_the_dtype_cannot_hold_are_refused_not_wrapped(tmp_path):
    from cm3leon_jax import workdir_io
    path = str(tmp_path / "rows.npy")
    scores = np.array([[0.5, -np.inf], [1e5, 2.0]], np.float32)   # -inf (no neighbour) is a value, 1e5 no float16
    workdir_io.write_npy_rows(path, scores, np.float32, chunk=1)
    np.testing.assert_array_equal(np.load(path), scores)
    with pytest.raises(ValueError, match="rows 1.. hold values past float16's range"):
        workdir_io.write_npy_rows(str(tmp_path / "half.npy"), scores, np.float16, chunk=1)
    with pytest.raises(ValueError, match=r"rows 0.. hold -1..2147483648, outside int32"):
        workdir_io.write_npy_rows(str(tmp_path / "ids.npy"), np.array([[2 ** 31, -1]], np.int64), np.int32)
    assert sorted(os.listdir(tmp_path)) == ["rows.npy"]   # nothing half-written left behind
