"""Text -> image throughput of `Generator.text_to_image` by decode batch size, on a trained model.

    python bench/text_to_image.py [--workdir workdirs/e2e/lm] [--captions 16] [--num_samples 8]
                                  [--batch_sizes 8,16,64] [--cfg_scale 3]

Captions are drawn from the shapes world's test split. `batch_size` = images decoded per call (each
with its unconditional CFG row); batch_size = num_samples is one caption a call, the old behaviour.
Every batch size must draw the same images (each sample keyed by its caption's index), which is
checked. Reranking and the VQ decode are included, as a user sees them. Needs a trained LM:
`python -m cm3leon_jax.e2e --config experiments/e2e_tiny.py --workdir workdirs/e2e --until lm`.
The last line printed is one JSON object of the figures.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", "workdirs/e2e/lm", "a trained LM's workdir (or params bundle)")
flags.DEFINE_integer("captions", 16, "captions", lower_bound=1)
flags.DEFINE_integer("num_samples", 8, "images per caption", lower_bound=1)
flags.DEFINE_list("batch_sizes", ["8", "16", "64"], "images per decode call")
flags.DEFINE_float("cfg_scale", 3.0, "CFG scale (1: no unconditional rows)")
flags.DEFINE_integer("repeats", 2, "timed repeats per batch size (best taken, after one untimed call)", lower_bound=1)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import flag_checks  # noqa: E402
from cm3leon_jax import evaluate, generate, sampling  # noqa: E402

flag_checks.int_list("batch_sizes")


def main(argv):
    flag_checks.no_arguments(argv)
    f = flags.FLAGS
    if not os.path.isdir(f.workdir):
        raise SystemExit(f"no model at {f.workdir}: train one with `python -m cm3leon_jax.e2e --config "
                         "experiments/e2e_tiny.py --workdir workdirs/e2e --until lm`")
    gen = generate.Generator(f.workdir)
    captions = evaluate.heldout_prompts(f.captions, gen.vq.image_size)["captions"]
    config = sampling.SamplingConfig(top_p=0.9, cfg_scale=f.cfg_scale)
    results = {"device": jax.devices()[0].device_kind, "workdir": f.workdir, "captions": f.captions,
               "num_samples": f.num_samples, "cfg_scale": f.cfg_scale}
    reference = None
    for batch_size in map(int, f.batch_sizes):
        def call():
            return gen.text_to_image(captions, num_samples=f.num_samples, config=config, seed=0, batch_size=batch_size)
        samples = call()   # compiles this batch size's shapes
        best = float("inf")
        for _ in range(f.repeats):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        codes = np.stack([s.codes for s in samples])
        if reference is None:
            reference = codes
        elif not np.array_equal(reference, codes):
            raise SystemExit(f"batch_size {batch_size} drew different images")
        images = f.captions * f.num_samples
        results[f"batch_{batch_size}"] = {"seconds": best, "images_per_second": images / best}
        print(f"batch_size {batch_size:4d}: {images / best:7.1f} images/s ({best:.2f} s for {images})", flush=True)
    sizes = [int(b) for b in f.batch_sizes]   # the keys' spelling ("08" is batch_8: a KeyError after the timings)
    first = results[f"batch_{sizes[0]}"]["seconds"]
    for b in sizes[1:]:
        results[f"batch_{b}"][f"speedup_vs_batch_{sizes[0]}"] = first / results[f"batch_{b}"]["seconds"]
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
