"""Interleaved (mixed-modal) generation: the compiled state machine (`decoding.generate_interleaved`:
one prefill, one loop over one KV cache, every document of a batch on its own) against decoding
phase by phase (a prefill of the document so far and, as its length crosses a bucket, a new
compilation for every text or image phase: what `Generator.interleaved` did before, one document
at a time), on the same documents.

    python bench/interleaved.py [--documents 8] [--image_tokens 64] [--max_images 2] [--max_text_tokens 32]

Small config of bench/train_step.py (d=512, 8 layers, vocab 8192), randomly initialised, greedy text
and images so both paths write the same documents (checked). Ids: `<break>`/`<eos>` as in vocab.py,
text 8..4095, image codes 4096..8191. A random model never chooses `<break>` by itself, so `<break>`
gets the head column of the text id it picks most (ties go to the lower id: `<break>` wins wherever
that id would), which makes documents switch modality. Times: cold (first call, compilation
included) and warm (median of --repeats). The last line printed is one JSON object of the figures.
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("documents", 8, "documents (one prompt each)", lower_bound=1)
flags.DEFINE_integer("prompt_length", 16, "prompt tokens", lower_bound=0)
flags.DEFINE_integer("image_tokens", 64, "ids per image (an 8x8 grid)", lower_bound=1)
flags.DEFINE_integer("max_images", 2, "images per document at most", lower_bound=1)
flags.DEFINE_integer("max_text_tokens", 32, "tokens per text phase at most", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "warm repeats (median)", lower_bound=1)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import flag_checks  # noqa: E402
from bench.train_step import small_config  # noqa: E402
from cm3leon_jax import decoding, sampling, sharding, trainer, vocab  # noqa: E402

GREEDY = sampling.SamplingConfig(temperature=0.0)
BREAK, EOS = vocab.SPECIAL_TOKENS.index("<break>"), vocab.SPECIAL_TOKENS.index("<eos>")
TEXT = ((8, 4096), (BREAK, BREAK + 1), (EOS, EOS + 1))
IMAGE = ((4096, 8192),)


def phase_by_phase(params, model_config, prompt, rules):
    """One document the old way: each phase re-prefills the document so far (image first)."""
    tokens, images = [*prompt, BREAK], 0
    while True:
        t, m = decoding.left_pad([tokens])
        codes, _ = decoding.generate_fixed(params, t, m, jax.random.key(0), model_config=model_config, streams=1,
                                           num_tokens=rules.image_tokens, config=GREEDY, allowed=IMAGE)
        tokens += [*np.asarray(codes)[0].tolist(), BREAK]
        images += 1
        t, m = decoding.left_pad([tokens])
        out, n = decoding.generate_until(params, t, m, jax.random.key(0), (BREAK, EOS), model_config=model_config,
                                         streams=1, max_tokens=rules.max_text_tokens, config=GREEDY, allowed=TEXT)
        new = np.asarray(out)[0, :int(np.asarray(n)[0])].tolist()
        stop = new[-1] if new and new[-1] in (BREAK, EOS) else None
        text = new[:-1] if stop is not None else new
        tokens += text
        if stop != BREAK or not text or images == rules.max_images:
            return tokens[len(prompt):]
        tokens.append(BREAK)  # opens the next image


def compiled(params, model_config, prompts, rules):
    tokens, mask = decoding.left_pad([[*p, BREAK] for p in prompts])
    out, lengths = decoding.generate_interleaved(params, tokens, mask, jax.random.key(0), model_config=model_config,
                                                 rules=rules, text_config=GREEDY, image_config=GREEDY,
                                                 text_allowed=TEXT, image_allowed=IMAGE, in_image=True)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [[BREAK, *row[:n].tolist()] for row, n in zip(out, lengths)]


def _timed(fn, repeats):
    # cold means compilation included: forget what earlier calls compiled (the batched path's shapes
    # were compiled to pick the favourite id; with one document, one by one has the batched shapes)
    jax.clear_caches()
    start = time.perf_counter()
    result = fn()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    return result, cold, statistics.median(warm)


def main(argv):
    flag_checks.no_arguments(argv)
    f = flags.FLAGS
    config = small_config()
    config.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    params, model_config = t.init_state(0).params, t.model_config
    rules = decoding.InterleaveRules(BREAK, EOS, f.image_tokens, f.max_images, f.max_text_tokens)
    rng = np.random.default_rng(0)
    prompts = [[EOS, *rng.integers(8, 4096, f.prompt_length).tolist()] for _ in range(f.documents)]
    with sharding.activate(mesh):
        first = compiled(params, model_config, prompts, rules)
        favourite = collections.Counter(x for d in first for x in d if 8 <= x < 4096).most_common(1)[0][0]
        head = params["output_head"]["kernel"]
        params["output_head"]["kernel"] = head.at[:, BREAK].set(head[:, favourite])
        batched, batched_cold, batched_warm = _timed(lambda: compiled(params, model_config, prompts, rules), f.repeats)
        one_by_one, single_cold, single_warm = _timed(
            lambda: [compiled(params, model_config, [p], rules)[0] for p in prompts], f.repeats)
        phased, phased_cold, phased_warm = _timed(
            lambda: [phase_by_phase(params, model_config, p, rules) for p in prompts], f.repeats)
    if not batched == one_by_one == phased:
        raise SystemExit("the three paths wrote different documents")
    tokens = sum(len(d) for d in batched)
    kinds = [[x >= 4096 for x in d if x != BREAK] for d in batched]
    phases = [1 + sum(a != b for a, b in zip(k, k[1:])) for k in kinds]
    images = [sum(1 for x in d if x >= 4096) // f.image_tokens for d in batched]
    results = {"device": jax.devices()[0].device_kind, "config": "small (d=512, 8 layers, vocab 8192)",
               "documents": f.documents, "new_tokens": tokens, "images_per_document": images,
               "mean_images": float(np.mean(images)), "phases": phases}
    for name, cold, warm in (("compiled_batched", batched_cold, batched_warm),
                             ("compiled_one_by_one", single_cold, single_warm),
                             ("phase_by_phase", phased_cold, phased_warm)):
        results[name] = {"cold_seconds": cold, "warm_seconds": warm, "warm_tokens_per_second": tokens / warm}
    for name in ("compiled_batched", "compiled_one_by_one"):
        results[name]["warm_speedup_vs_phase_by_phase"] = phased_warm / results[name]["warm_seconds"]
        results[name]["cold_speedup_vs_phase_by_phase"] = phased_cold / results[name]["cold_seconds"]
    for name in ("compiled_batched", "compiled_one_by_one", "phase_by_phase"):
        r = results[name]
        print(f"{name:20s} cold {r['cold_seconds']:7.2f} s  warm {r['warm_seconds']:7.2f} s  "
              f"{r['warm_tokens_per_second']:8.1f} tokens/s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
