"""The benches' own measuring code (bench/*.py): what each figure claims to include. Each check runs
in its own process: the bench modules define absl flags at import, some under the same names."""
import json
import subprocess
import sys
import textwrap

from tests.helpers import REPO, cli_env


# defined in every script `_python` runs: benches imported one after another share flag names, so
# each one's flags are removed before the next is imported
_PREAMBLE = """
def forget_bench_flags():
    from absl import flags
    for module_name, defined in list(flags.FLAGS.flags_by_module_dict().items()):
        if module_name.startswith(("bench", "neighbour_quality")):
            for flag in list(defined):
                if flag.name in flags.FLAGS:
                    delattr(flags.FLAGS, flag.name)
"""


def _python(code: str, timeout: float = 300) -> str:
    script = _PREAMBLE + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env=cli_env(1), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_interleaved_cold_time_includes_compilation():
    """A function compiled before its timing (the batched path: compiled to pick the favourite id)
    is compiled again for its cold time, once."""
    out = _python("""
        import jax, jax.numpy as jnp
        from bench import interleaved
        traces = []
        @jax.jit
        def f(x):
            traces.append(1)
            return x + 1
        f(jnp.ones(3))
        interleaved._timed(lambda: f(jnp.ones(3)), 2)
        print(len(traces))
    """)
    assert out.split()[-1] == "2"


def test_decode_no_cache_baseline_compiles_outside_its_timing():
    """The no-cache baseline's warm-up compiles the forward at the timed run's length, and the timed
    decode compiles nothing (a jit per call compiled inside the timing: a 23x 'speedup' at 2 tokens)."""
    out = _python("""
        import jax, numpy as np
        from bench import decode
        traces = []
        def forward_fn(p, t, pos, s):
            traces.append(t.shape)
            return jax.numpy.zeros((*t.shape, 16)) + p
        class Model:
            def apply(self, variables, t, pos, s):
                return forward_fn(variables["params"], t, pos, s)
        forward = decode.no_cache_forward(Model())
        tokens, mask = np.ones((2, 3), np.int32), np.ones((2, 3), np.int32)
        decode.no_cache_decode(forward, 0.0, tokens, mask, 1, jax.random.key(0), 3 + 4)   # the warm-up
        decode.no_cache_decode(forward, 0.0, tokens, mask, 4, jax.random.key(0))          # the timed run
        print(traces)
    """)
    assert out.strip().splitlines()[-1] == "[(2, 7)]"


# bench -> (flags its required ones need, [(a bad value, the flag the refusal must name), ...])
BAD_FLAGS = {
    "train_step": ([], [("--configs=nope", "--configs"), ("--variants=default,nope", "--variants"),
                        ("--steps=0", "--steps")]),
    "ah_distortion": ([], [("--dims_per_block=0", "--dims_per_block"), ("--points=10", "--points"),
                           ("--iterations=-1", "--iterations"), ("--scanned=-5", "--scanned")]),
    "decode": ([], [("--batches=0", "--batches"), ("--batches=x", "--batches"), ("--new_tokens=0", "--new_tokens"),
                    ("--repeats=0", "--repeats")]),
    "interleaved": ([], [("--documents=0", "--documents"), ("--image_tokens=0", "--image_tokens"),
                         ("--repeats=0", "--repeats")]),
    "text_to_image": ([], [("--batch_sizes=", "--batch_sizes"), ("--repeats=0", "--repeats"),
                           ("--captions=0", "--captions")]),
    "retrieval": ([], [("--k=0", "--k"), ("--search_batch=0", "--search_batch"), ("--sizes=5", "--sizes"),
                       ("--fractions=0", "--fractions"), ("--fractions=2", "--fractions"), ("--repeats=0", "--repeats"),
                       ("--num_queries=0", "--num_queries"), ("--bf_batch=0", "--bf_batch")]),
    "neighbour_quality": (["--data=d"], [("--num_queries=0", "--num_queries"), ("--variants=[1]", "--variants"),
                                         ("--variants={bad", "--variants")]),
    "oracle_retrieval": (["--data=d"], [("--num_prompts=0", "--num_prompts"),
                                        ("--image_neighbours=-1", "--image_neighbours")]),
    "pipeline": ([], [("--worker_counts=-1", "--worker_counts"), ("--seconds=0", "--seconds"),
                      ("--seq_len=0", "--seq_len")]),
    "ingest": ([], [("--parts=1", "--parts"), ("--merge_file_mb=0", "--merge_file_mb"),
                    ("--num_documents=0", "--num_documents")]),
    "index_hosts": ([], [("--hosts=0", "--hosts"), ("--hosts=8", "--hosts"), ("--num_shards=0", "--num_shards"),
                         ("--candidates=0", "--candidates")]),
    "vq": ([], [("--budget_minutes=0", "--budget_minutes"), ("--num_val_images=0", "--num_val_images"),
                ("--override=total_steps", "--override")]),
}


def test_benches_refuse_bad_flags_at_parsing():
    """0, negative and unknown values stop a bench while its flags are parsed, naming the flag (they
    crashed deep inside numpy or ScaNN, segfaulted, or printed a figure of nothing). One process:
    each bench's flags are removed before the next is imported (some share names)."""
    out = _python(f"""
        import importlib
        from absl import flags
        FLAGS = flags.FLAGS
        for name, (base, cases) in {BAD_FLAGS!r}.items():
            module = importlib.import_module("bench." + name)
            FLAGS(["bench", *base])   # the defaults parse
            FLAGS.unparse_flags()
            for arg, flag in cases:
                try:
                    FLAGS(["bench", *base, arg])
                    print("ACCEPTED", name, arg)
                except flags.Error as e:
                    print("REFUSED" if flag + "=" in str(e) or flag + ":" in str(e) or flag + " " in str(e)
                          else "UNNAMED", name, arg, "|", str(e).replace(chr(10), " "))
                FLAGS.unparse_flags()
            forget_bench_flags()
    """)
    lines = [line for line in out.splitlines() if line.startswith(("ACCEPTED", "REFUSED", "UNNAMED"))]
    assert len(lines) == sum(len(cases) for _, cases in BAD_FLAGS.values()), out
    assert all(line.startswith("REFUSED") for line in lines), "\n".join(lines)


def test_pipeline_data_rebuilt_with_other_settings_and_its_mixture_copy_follow(tmp_path):
    """bench/pipeline.py's data built again with other settings holds the new documents (ingesting
    over the old build kept its documents: image_side 2 timed as 3), and the mixture's copy of it is
    made again (the old copy was kept: the mixture mixed the old documents in, or failed)."""
    out = _python(f"""
        import json, os
        from bench import pipeline
        from data_pipeline import prepare
        data = {str(tmp_path / "data")!r}
        for side in (2, 3):
            pipeline.build_data(data, 60, side, 64, 0)
            copy = pipeline.mixture_copy(data)
            vocab = [json.load(open(os.path.join(d, "vocab", "vocab.json"))) for d in (data, copy)]
            codes = [int((prepare.load_tokens(d, "train")[0]["tokens"] >= v["image_offset"]).sum())
                     for d, v in zip((data, copy), vocab)]
            print(side, [v["image_tokens_per_image"] for v in vocab], codes)
    """)
    lines = [line for line in out.splitlines() if line[:2] in ("2 ", "3 ")]
    assert lines == ["2 [4, 4] [4, 4]", "3 [9, 9] [9, 9]"], out


def test_ingest_bench_stops_when_an_ingestion_process_fails():
    """A part's process that dies (here: called with too few arguments) stops the bench with its
    exit code; the bench waited forever on the figure it would have sent."""
    out = _python("""
        from bench import ingest
        try:
            ingest._run([("too", "few")])
        except RuntimeError as e:
            print("STOPPED", e)
    """, timeout=120)
    assert "STOPPED an ingestion process failed with exit code 1" in out, out


def test_text_to_image_bench_batch_sizes_spelled_with_leading_zeros(tmp_path):
    """--batch_sizes=4,08 (accepted: integers) ends with its JSON line; the speedups looked the
    sizes up by their spelling ("batch_08") and crashed after every timing."""
    out = _python(f"""
        import types
        import numpy as np
        from absl import flags
        from bench import text_to_image

        class Generator:
            def __init__(self, workdir):
                self.vq = types.SimpleNamespace(image_size=16)
            def text_to_image(self, captions, num_samples, config, seed, batch_size):
                return [types.SimpleNamespace(codes=np.zeros((2, 2), np.int32))] * (len(captions) * num_samples)

        text_to_image.generate.Generator = Generator
        flags.FLAGS(["bench", "--workdir", {str(tmp_path)!r}, "--captions=1", "--num_samples=1",
                     "--batch_sizes=4,08", "--repeats=1"])
        text_to_image.main([])
    """)
    figures = json.loads(out.strip().splitlines()[-1])
    assert "speedup_vs_batch_4" in figures["batch_8"], figures


def test_ingest_bench_merge_timed_after_a_warm_up(tmp_path):
    """The merges are timed after an untimed one: a process's first merge pays one-time imports
    (~0.2 s), which were timed as the 1-worker merge's (28 against 597 docs/s on 6 documents)."""
    out = _python(f"""
        import os, time
        from absl import flags
        from bench import ingest
        from data_pipeline import ingest_parts, prepare

        calls = []
        def merge_parts(out_dir, workers=1):
            os.makedirs(prepare.documents_dir(out_dir), exist_ok=True)
            if not calls:
                time.sleep(1.0)   # the first merge's imports
            calls.append(workers)

        ingest._run = lambda processes: (1.0, [1.0] * len(processes))
        ingest._same_documents = lambda a, b: True
        ingest_parts.merge_parts = merge_parts
        flags.FLAGS(["bench", "--workdir", {str(tmp_path)!r}, "--num_documents=2", "--repeats=2"])
        ingest.main([])
    """)
    figures = json.loads(out.strip().splitlines()[-1])
    assert all(r["merge_docs_per_s_1_worker"] > 4 for r in figures["rounds"]), figures["rounds"]


def test_index_hosts_peak_memory_is_the_stage_process_own(tmp_path):
    """A stage's peak resident memory is its process's own: the child's ru_maxrss, read before,
    held this bench's own high-water mark (exec carries it over), 600 MiB here, for every stage."""
    out = _python(f"""
        import numpy as np
        from absl import flags
        from bench import index_hosts
        flags.FLAGS(["bench", "--workdir", {str(tmp_path)!r}, "--num_documents=3", "--dim=4", "--clusters=2",
                     "--num_shards=1", "--hosts=1"])
        embeddings = index_hosts.documents({str(tmp_path)!r})
        ballast = np.ones(600 * 2 ** 20 // 8)   # the bench's own peak
        del ballast
        single, _ = index_hosts.one_host({str(tmp_path / "documents")!r}, embeddings)
        print("PEAK", single["peak_rss_mib"])
    """)
    peak = float(out.split("PEAK")[-1])
    assert 0 < peak < 500, out[-2000:]


def test_benches_refuse_words_that_are_not_flags():
    """`--dims_per_block 2 4` (a list given with spaces) is refused: every bench's main dropped the
    `4` that absl leaves over, and measured the first item alone."""
    out = _python(f"""
        import importlib
        from absl import app, flags
        FLAGS = flags.FLAGS
        for name in {sorted(BAD_FLAGS)!r}:
            module = importlib.import_module("bench." + name)
            try:
                module.main(["bench", "4"])
                print("RAN", name)
            except app.UsageError as e:
                print("REFUSED" if "unexpected arguments 4" in str(e) else "UNNAMED", name)
            forget_bench_flags()
    """)
    lines = [line for line in out.splitlines() if line.startswith(("RAN", "REFUSED", "UNNAMED"))]
    assert len(lines) == len(BAD_FLAGS) and all(line.startswith("REFUSED") for line in lines), out[-3000:]


def test_neighbour_quality_scores_only_queries_it_can_and_writes_no_nan():
    """A caption naming no object divided by zero, and no query with neighbours gave bare NaN in the JSON."""
    import json
    import numpy as np
    from bench import neighbour_quality
    scenes = [({("circle", "red", "left")}, "black"), (set(), "white"), ({("circle", "red", "left")}, "black")]
    emb = np.eye(3, dtype=np.float32)
    ids = np.array([[2], [0], [-1]])
    got = neighbour_quality.score(ids, emb, emb, np.arange(3), scenes, np.random.default_rng(0))
    assert got["queries_scored"] == 1 and got["union_object_share"] == 1.0
    none = neighbour_quality.score(np.full((3, 1), -1), emb, emb, np.arange(3), scenes, np.random.default_rng(0))
    assert none["union_object_share"] is None and "NaN" not in json.dumps(none)
