"""Evaluation of a trained CM3Leon on the shapes world: does the system actually learn?

    python -m cm3leon_jax.evaluate --workdir LM_WORKDIR [--out DIR] [--strategies topp_topk_cfg,topp]
        [--num_prompts 64] [--num_samples 4] [--classifier_dir DIR] [--cfg_scale 2.0] [--top_p 0.9]
        [--top_k 32] [--temperature 1.0] [--image_neighbours 2] [--split validation]

Scores, all on held-out data (the shapes world's test split for prompts and images, the data's
validation split for losses; `--split validation` draws prompts and images from the validation
split instead, for tuning decoding settings without touching test):
  (a) text -> image faithfulness: held-out captions -> images by each decoding strategy -> the
      attribute classifier reads them back -> share of requested attributes present
      (`shapes_metrics.text_to_image_faithfulness`; `requested` = mean of shape, colour,
      position and count, the issue's four);
  (b) image -> text accuracy: held-out images -> captions (CM3 infilling, greedy) -> share of
      true attributes named correctly (`shapes_metrics.caption_accuracy`);
  (c) Frechet distance between generated and real images in the attribute classifier's feature
      space (named for what it is: not FID; `--feature_network` adds one in a user-supplied
      network's feature space, e.g. an Inception port, see shapes_metrics.load_feature_network;
      `--clip_model DIR`, a local Hugging Face CLIP checkpoint, adds the CLIP score of every
      scored image against its caption and a Frechet distance in CLIP image features, see
      clip_metrics);
  (d) validation loss of the query documents with 0, 1 and 2 retrieved neighbours prepended
      (`<eos> neighbours query <eos>`, loss on the query's tokens only, no masking);
  (e) VQ tokenizer PSNR, codebook usage and perplexity on held-out images.
Writes OUT/report.json, OUT/report.md and PNG grids (generated images per strategy, captioned
images). A trained model directory or an exported params bundle both work (through Generator).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cm3leon_jax import attribute_classifier, image_grid, losses, sampling, sharding, shapes_metrics
from cm3leon_jax import vq_tokenizer, workdir_io
from data_pipeline import cm3, shapes_world

REQUESTED = ("shape", "color", "position", "count")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One row of the decoding-strategy table: how every sample of a prompt is drawn."""
    config: sampling.SamplingConfig
    cd_fraction: float = 0.0   # share of samples drawn by CD-K (the rest by `config`)
    rerank: bool = False       # sort by retriever similarity and score only the best sample


_TOP_P, _TOP_K, _CFG = 0.9, 32, 3.0
# The paper's decoding table, in its reported order from worst to best, plus CD-K and its mix.
STRATEGIES: dict[str, Strategy] = {
    "greedy": Strategy(sampling.SamplingConfig(temperature=0.0)),
    "topp": Strategy(sampling.SamplingConfig(top_p=_TOP_P)),
    "topk": Strategy(sampling.SamplingConfig(top_k=_TOP_K)),
    "topp_cfg": Strategy(sampling.SamplingConfig(top_p=_TOP_P, cfg_scale=_CFG)),
    "topp_topk_cfg": Strategy(sampling.SamplingConfig(top_p=_TOP_P, top_k=_TOP_K, cfg_scale=_CFG)),
    "cdk": Strategy(sampling.SamplingConfig(cd_k=sampling.DEFAULT_CD_K)),
    "topp_cdk_rerank": Strategy(sampling.SamplingConfig(top_p=_TOP_P, cfg_scale=_CFG), cd_fraction=0.5,
                                rerank=True),
}
DEFAULT_STRATEGIES = ("topp_topk_cfg", "topp")
BASELINE_STRATEGY = "topp"  # what the others are compared with, paired by prompt, when it is scored


def parse_strategies(names: str | Sequence[str]) -> list[str]:
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise ValueError(f"unknown decoding strategies {unknown or names}; known: {sorted(STRATEGIES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:   # each would be drawn and scored again, its report row written twice
        raise ValueError(f"decoding strategies named more than once: {repeated}")
    return names


def heldout_prompts(num: int, image_size: int, split: str = "test", seed: int = 0) -> dict[str, Any]:
    """Captions, scenes and renders of the first `num` examples of a held-out shapes split."""
    config = shapes_world.ShapesWorldConfig(image_size=image_size, seed=seed)
    examples = [shapes_world.example(split, i, config) for i in range(int(num))]
    return {"captions": [e["caption"] for e in examples], "images": np.stack([e["image"] for e in examples]),
            "scenes": [{"objects": e["objects"], "background": e["background"]} for e in examples]}


SAMPLING_KNOBS = ("cfg_scale", "top_p", "top_k", "temperature", "cd_k", "cd_alpha")
CD_STRATEGY = "cdk"  # its settings also draw the CD-K share of a mixed strategy (cd_fraction > 0)


def strategy_sampling(strategy_name: str, **overrides: float | None) -> sampling.SamplingConfig:
    """A strategy's sampling settings with the given knobs (SAMPLING_KNOBS; None = keep) replaced
    where the strategy uses them: cfg_scale where it guides, top_p / top_k where it filters,
    temperature where it samples (not greedy, not CD-K), cd_k / cd_alpha where it contrasts. A setting tuned on the validation split then
    applies to every row of the decoding table without changing what each row is."""
    unknown = sorted(set(overrides) - set(SAMPLING_KNOBS))
    if unknown:
        raise ValueError(f"unknown sampling settings {unknown}; known: {SAMPLING_KNOBS}")
    config = STRATEGIES[strategy_name].config
    uses = {"cfg_scale": config.cfg_scale != 1.0, "top_p": config.top_p < 1.0, "top_k": config.top_k > 0,
            "temperature": config.temperature > 0 and config.cd_k == 0, "cd_k": config.cd_k > 0,
            "cd_alpha": config.cd_k > 0}
    is_count = lambda v: v >= 1 and v == int(v)  # noqa: E731
    checks = {"cfg_scale": lambda v: v >= 0, "top_p": lambda v: 0 < v <= 1, "top_k": is_count,
              "temperature": lambda v: v > 0, "cd_k": is_count, "cd_alpha": lambda v: 0 < v <= 1}
    changes = {}
    for knob, value in overrides.items():
        if value is None:
            continue
        if not checks[knob](value):
            raise ValueError(f"{knob}={value} is out of range (cfg_scale >= 0, 0 < top_p <= 1, integer "
                             "top_k >= 1, temperature > 0, integer cd_k >= 1, 0 < cd_alpha <= 1)")
        if uses[knob]:
            changes[knob] = int(value) if knob in ("top_k", "cd_k") else float(value)
    return dataclasses.replace(config, **changes)


def requested_share(scores: dict[str, float]) -> float:
    return float(np.mean([scores[k] for k in REQUESTED]))


# ----------------------------------------------------------------------------- (a) + (c)


def text_to_image(gen, classifier, prompts, strategy_name: str, *, num_samples: int, seed: int,
                  real_features: np.ndarray, feature_network=None, clip_scorer=None, clip_real=None,
                  neighbours: int = 0,
                  sampling_overrides: Mapping[str, float | None] | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Scores one strategy; returns (scores, the images grid rows [prompts, samples], the requested
    attributes' hits per prompt for `shapes_metrics.bootstrap_comparison`). `neighbours`
    documents retrieved by each caption are prepended to its prompt (the paper's 0, 1 or 2);
    `sampling_overrides` go through `strategy_sampling`. `clip_real`: the CLIP features of the
    prompts' real images and captions ({"images", "captions"}), computed once for all strategies."""
    strategy = STRATEGIES[strategy_name]
    config = strategy_sampling(strategy_name, **(sampling_overrides or {}))
    cd_config = strategy_sampling(CD_STRATEGY, **(sampling_overrides or {})) if strategy.cd_fraction else None
    rerank = strategy.rerank and gen.can_rerank
    samples = gen.text_to_image(prompts["captions"], num_samples=num_samples, config=config,
                                cd_fraction=strategy.cd_fraction, cd_config=cd_config, rerank=rerank, seed=seed,
                                num_neighbours=neighbours)
    # reranked: the best sample of each prompt is the answer; otherwise every sample is scored
    scored = [s.images[:1] if rerank else s.images for s in samples]
    flat = np.concatenate(scored)
    requested = [scene for scene, imgs in zip(prompts["scenes"], scored) for _ in range(len(imgs))]
    prompt_of_image = np.repeat(np.arange(len(scored)), [len(imgs) for imgs in scored])
    hits = shapes_metrics.image_hits(requested, attribute_classifier.predict_scenes(classifier, flat))
    scores = shapes_metrics.summarise_hits(hits)
    scores["requested"] = requested_share(scores)
    totals = shapes_metrics.hit_totals(hits, prompt_of_image, len(scored), REQUESTED)
    # the scored images (reranked: each prompt's best only), as for the user network's and CLIP's
    gen_features = attribute_classifier.features(classifier, flat)
    scores["frechet_distance_classifier_features"] = shapes_metrics.frechet_distance(gen_features, real_features)
    scores["sample_diversity"] = shapes_metrics.sample_diversity([s.images for s in samples])
    if feature_network is not None:
        scores["frechet_distance_user_network"] = shapes_metrics.frechet_distance(
            shapes_metrics.features_from_network(feature_network, flat),
            shapes_metrics.features_from_network(feature_network, prompts["images"]))
    if clip_scorer is not None:
        from cm3leon_jax import clip_metrics
        generated = clip_scorer.image_features(flat)   # the scored images, each beside its own prompt's caption
        scores["clip_score"] = clip_metrics.clip_score_from_features(generated, clip_real["captions"][prompt_of_image])
        scores["frechet_distance_clip_features"] = shapes_metrics.frechet_distance(generated, clip_real["images"])
    scores.update(num_samples=num_samples, neighbours=int(neighbours), reranked=rerank, scored_images=int(len(flat)),
                  sampling=dataclasses.asdict(config), cd_fraction=strategy.cd_fraction,
                  cd_sampling=dataclasses.asdict(cd_config) if cd_config else None)
    return scores, np.stack([s.images for s in samples]), totals


def vq_ceiling(vq, classifier, prompts) -> dict:
    """The same scores for the prompts' own rendered images after a round trip through the VQ
    tokenizer `vq`: the best any LM can reach through it, so a faithfulness figure can be read
    against it (and a tokenizer judged by what survives it, not only by PSNR)."""
    round_trip = vq.decode(vq.encode(prompts["images"]))  # VQTokenizer batches internally
    scores = shapes_metrics.text_to_image_faithfulness(
        list(prompts["scenes"]), attribute_classifier.predict_scenes(classifier, round_trip))
    scores["requested"] = requested_share(scores)
    return scores


def nearest_caption(gen, retrieved: Sequence[np.ndarray]) -> str:
    """The caption of the first document retrieved for an image ("" when there is none)."""
    if not retrieved:
        return ""
    end = cm3.caption_end(retrieved[0], image_offset=gen.vocab.image_offset, break_id=gen.vocab.break_id)
    return gen.vocab.decode_text(retrieved[0][:end])


# ----------------------------------------------------------------------------- (d)


def _query_weighted_rows(sequences: Sequence[tuple[np.ndarray, tuple[int, int]]], rows: int, length: int):
    """Rows of `<eos> neighbours query <eos>` with loss weight 1 on the query's tokens only."""
    batch = {k: np.zeros((rows, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["weights"] = np.zeros((rows, length), np.float32)
    for r, (tokens, (start, end)) in enumerate(sequences):
        n = len(tokens) - 1
        batch["inputs"][r, :n], batch["targets"][r, :n] = tokens[:-1], tokens[1:]
        batch["segment_ids"][r, :n], batch["positions"][r, :n] = 1, np.arange(n)
        batch["weights"][r, start - 1:end - 1] = 1.0  # targets[j] = tokens[j + 1]
    return batch


def _check_neighbour_counts(neighbour_counts: Sequence[int]) -> None:
    """At least one count, each an integer >= 0 (else max() or a negative slice fails after generation)."""
    if not len(neighbour_counts) or any(int(k) != k or k < 0 for k in neighbour_counts):
        raise ValueError(f"neighbour_counts must be one or more integers >= 0 (e.g. 0,1,2), got {list(neighbour_counts)}")


def validation_loss(gen, documents: Sequence[dict], neighbour_counts: Sequence[int],
                    batch_size: int = 16) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Mean loss per query token with k retrieved neighbours prepended, for each k: whether the
    model uses retrieved documents (lower with k > 0) is what this measures. Neighbours are found
    as at inference: the document's caption queries the training bank (near duplicates skipped).
    Also returns each k's summed loss and tokens per document (`shapes_metrics.hit_totals` layout)
    for the paired bootstrap."""
    _check_neighbour_counts(neighbour_counts)
    model, mesh = gen.trainer.model, gen.mesh
    multiple = sharding.data_parallel_size(mesh)
    rows = -(-batch_size // multiple) * multiple

    @jax.jit
    def row_losses(params, batch):  # summed loss and token count per row: one row per document
        logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
        token_ce, _ = losses.token_cross_entropy(logits, batch["targets"])
        return jnp.sum(token_ce * batch["weights"], axis=-1), jnp.sum(batch["weights"], axis=-1)

    max_k = max(neighbour_counts)
    retrieved = []
    if max_k > 0:
        if not gen.can_retrieve:
            raise ValueError("validation loss with neighbours needs the data's retriever and ScaNN index")
        for doc in documents:
            caption = gen.vocab.decode_text(np.asarray(doc["text_ids"], np.int32))
            retrieved.append(gen.retrieve(caption, max_k))
    layouts = {k: [cm3.retrieval_augmented_sequence(np.asarray(doc["tokens"], np.int32),
                                                    retrieved[i][:k] if k else (), gen.vocab.eos_id)
                   for i, doc in enumerate(documents)] for k in neighbour_counts}
    # every k is scored on the same documents: those whose longest layout fits the model
    limit = gen.model_config.max_length
    keep = [i for i in range(len(documents)) if all(len(layouts[k][i].tokens) - 1 <= limit for k in neighbour_counts)]
    if not keep:
        raise ValueError(f"no validation document fits max_length={limit} with {max_k} neighbours")
    out, per_document = {}, {}
    for k in neighbour_counts:
        seqs = [(layouts[k][i].tokens, layouts[k][i].query_span) for i in keep]
        longest = max(len(t) for t, _ in seqs) - 1
        length = min(-(-longest // 32) * 32, limit)
        sums, counts = [], []
        with sharding.activate(mesh):
            for i in range(0, len(seqs), rows):
                batch = sharding.global_batch_from_local(_query_weighted_rows(seqs[i:i + rows], rows, length), mesh)
                s, c = row_losses(gen.params, batch)
                real = len(seqs[i:i + rows])  # the rest of the rows are padding
                sums.append(np.asarray(s, np.float64)[:real])
                counts.append(np.asarray(c, np.float64)[:real])
        # per document, in the layout of shapes_metrics.hit_totals: the bootstrap's share is the loss
        per_document[str(k)] = np.stack([np.concatenate(sums), np.concatenate(counts)], axis=-1)[:, None, :]
        count = float(per_document[str(k)][..., 1].sum())
        out[str(k)] = {"loss": float(per_document[str(k)][..., 0].sum()) / max(count, 1.0), "query_tokens": int(count),
                       "documents": len(keep), "skipped_too_long": len(documents) - len(keep),
                       "neighbours_found": float(np.mean([min(len(retrieved[i]), k) for i in keep])) if k else 0.0}
    return out, per_document


# ----------------------------------------------------------------------------- the whole evaluation


def _bootstrap_lines(boot: dict | None, what: str, row_name: str, unit: str) -> list[str]:
    """The markdown table of a `shapes_metrics.bootstrap_comparison` result."""
    if not boot or not boot["shares"]:
        return []
    pct = lambda v: f"{100 * v:+.1f}"  # noqa: E731
    lines = [f"{what} with {100 * boot['level']:.0f}% percentile-bootstrap intervals over the {boot['num_items']} "
             f"{unit} ({boot['num_resamples']} resamples; differences paired by {unit[:-1]} against "
             f"{boot['baseline'] or 'no baseline'})", "",
             f"| {row_name} | share | interval | difference | interval of the difference | "
             "resamples above the baseline (ties: half) |", "|---|---|---|---|---|---|"]
    for name, b in boot["shares"].items():
        d = boot["differences"].get(name)
        lo, hi = b["interval"]
        cells = ([f"{pct(d['difference'])} points", f"[{pct(d['interval'][0])}, {pct(d['interval'][1])}]",
                  f"{100 * d['above_baseline']:.1f}%"] if d else
                 ["(baseline)" if name == boot["baseline"] else "", "", ""])
        lines.append(f"| {name} | {100 * b['share']:.1f}% | [{100 * lo:.1f}%, {100 * hi:.1f}%] | " + " | ".join(cells)
                     + " |")
    return lines + [""]


def _markdown(report: dict) -> str:
    weights = "; int8 weight-only kernels" if report.get("int8") else ""
    weights += f"; {report['compute_dtype']} compute" if report.get("compute_dtype", "float32") != "float32" else ""
    lines = [f"# Evaluation of {report['workdir']} (step {report['step']}{weights}; prompts and images from the "
             f"{report.get('prompt_split', 'test')} split)", ""]
    t2i = report.get("text_to_image", {})
    if t2i:
        cols = ("requested", "shape", "color", "position", "count", "size", "background", "all_correct")
        lines += ["## Text -> image faithfulness (held-out captions; attribute classifier)", "",
                  "| strategy | " + " | ".join(cols) + " | Frechet dist. (classifier features) | sample diversity |",
                  "|---" * (len(cols) + 3) + "|"]
        for name, s in t2i.items():
            shown = f"{name}, {s['neighbours']} retrieved" if s.get("neighbours") else name
            lines.append(f"| {shown} | " + " | ".join(f"{100 * s[c]:.1f}%" for c in cols)
                         + f" | {s['frechet_distance_classifier_features']:.3f} | {s['sample_diversity']:.4f} |")
        ceiling = report.get("text_to_image_vq_ceiling")
        if ceiling:
            lines.append("| (ceiling: the real images through the VQ) | "
                         + " | ".join(f"{100 * ceiling[c]:.1f}%" for c in cols) + " | | |")
        lines.append("")
        lines += _bootstrap_lines(report.get("text_to_image_bootstrap"), "Requested attributes", "strategy", "prompts")
        user = {name: s["frechet_distance_user_network"] for name, s in t2i.items()
                if "frechet_distance_user_network" in s}
        if user:   # --feature_network: was in report.json only
            lines += ["Frechet distance in the features of the user-supplied network (--feature_network) against "
                      "the prompts' real images", "", "| strategy | Frechet dist. (user network) |", "|---|---|"]
            lines += [f"| {name} | {value:.3f} |" for name, value in user.items()] + [""]
        clip = report.get("clip")
        if clip:
            lines += [f"CLIP ({clip['model']}): CLIP score of the scored images against their captions and Frechet "
                      "distance in CLIP image features against the real images (FD_CLIP, not FID)", "",
                      "| strategy | CLIP score | Frechet dist. (CLIP features) |", "|---|---|---|"]
            lines += [f"| {name} | {s['clip_score']:.2f} | {s['frechet_distance_clip_features']:.3f} |"
                      for name, s in t2i.items()]
            lines += [f"| (the real images) | {clip['real_images_clip_score']:.2f} | |", ""]
    i2t = report.get("image_to_text")
    if i2t:
        cols = ("shape", "color", "size", "position", "count", "background", "overall", "unparseable")
        retrieved = f"; {i2t['neighbours']} retrieved documents prepended" if i2t.get("neighbours") else ""
        rows = [("generated", i2t)]
        if report.get("image_to_text_nearest_caption"):
            rows.append(("the nearest bank document's caption (control)", report["image_to_text_nearest_caption"]))
        lines += [f"## Image -> text accuracy (held-out images; greedy captions{retrieved})", "",
                  "| captions | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| " + name + " | " + " | ".join(f"{100 * r[c]:.1f}%" for c in cols) + " |" for name, r in rows]
        lines.append("")
        lines += _bootstrap_lines(report.get("image_to_text_bootstrap"), "Overall caption accuracy", "captions", "images")
    val = report.get("validation_loss")
    if val:
        boot = report.get("validation_loss_bootstrap") or {"differences": {}, "baseline": None}
        # (one k alone, e.g. no retriever to compare with: nothing to subtract)
        minus = (f"minus k={boot['baseline']} [95% bootstrap interval, paired by document]"
                 if boot["baseline"] is not None else "difference (one k alone: none)")
        lines += ["## Validation loss of the query document with k retrieved neighbours", "",
                  f"| k | loss | {minus} | neighbours found per document | query tokens |", "|---|---|---|---|---|"]
        for k, v in val.items():
            d = boot["differences"].get(k)
            diff = f"{d['difference']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]" if d else ""
            lines.append(f"| {k} | {v['loss']:.4f} | {diff} | {v.get('neighbours_found', 0.0):.2f} | "
                         f"{v['query_tokens']} |")
        lines.append("")
    vq = report.get("vq")
    if vq:
        lines += ["## VQ tokenizer (held-out images)", "",
                  "| PSNR | codes used | code perplexity | code entropy of identical patches |",
                  "|---|---|---|---|", f"| {vq['psnr_db']:.2f} dB | {100 * vq['codebook_usage']:.1f}% | "
                  f"{vq['code_perplexity']:.1f} | {vq.get('same_patch_code_entropy_nats', float('nan')):.2f} nats |", ""]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def evaluate(workdir: str, *, out_dir: str | None = None, strategies: Sequence[str] = DEFAULT_STRATEGIES,
             num_prompts: int = 64, num_samples: int = 4, num_captions: int = 64, num_val_documents: int = 128,
             neighbour_counts: Sequence[int] = (0, 1, 2), num_vq_images: int = 256,
             classifier_dir: str | None = None, classifier_steps: int = attribute_classifier.DEFAULT_STEPS,
             feature_network: str | None = None, clip_model: str | None = None, step: int | None = None,
             seed: int = 0, classifier_seed: int = 0,
             image_neighbours: int = 0, cfg_scale: float | None = None, top_p: float | None = None,
             top_k: int | None = None, temperature: float | None = None, cd_k: int | None = None,
             cd_alpha: float | None = None, split: str = "test", caption_neighbours: int = 0,
             int8: bool = False, compute_dtype: str | None = None, baseline_strategy: str | None = None) -> dict:
    """Runs (a)-(e) and writes report.json, report.md and PNG grids into `out_dir`. cfg_scale, top_p,
    top_k, temperature, cd_k and cd_alpha replace the strategies' own where they use them (`strategy_sampling`):
    tune them on the validation split, report test. `caption_neighbours` documents retrieved by each
    held-out image are prepended to its image -> text prompt. `int8`: the LM decodes and is scored
    with int8 weight-only kernels (`quantization.py`), to see what quantization costs;
    `compute_dtype` ("bfloat16") decodes in that precision, to see what it costs.
    `baseline_strategy`: what the paired bootstrap compares every strategy with (default TopP when
    scored, else the first). `seed` draws the samples; the attribute classifier, the judge, has its
    own `classifier_seed`, so evaluations under several sampling seeds are scored by one classifier."""
    from cm3leon_jax.generate import Generator
    from data_pipeline import prepare
    start = time.time()
    strategies = parse_strategies(strategies)
    for name, value in (("image_neighbours", image_neighbours), ("caption_neighbours", caption_neighbours)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in (("num_prompts", num_prompts), ("num_samples", num_samples), ("num_captions", num_captions),
                        ("num_val_documents", num_val_documents), ("num_vq_images", num_vq_images)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if int(num_val_documents):
        _check_neighbour_counts(neighbour_counts)
    if int(num_prompts) == 1:
        raise ValueError("num_prompts must be 0 or at least 2: the Frechet distance needs two real images")
    if not int(num_prompts) or not int(num_samples):
        strategies = []  # no text -> image requested
    overrides = dict(cfg_scale=cfg_scale, top_p=top_p, top_k=top_k, temperature=temperature, cd_k=cd_k,
                     cd_alpha=cd_alpha)
    for name in strategies:  # bad settings fail here, before the model loads and the classifier trains
        strategy_sampling(name, **overrides)
    if baseline_strategy and baseline_strategy not in strategies:
        raise ValueError(f"baseline_strategy {baseline_strategy!r} is not among the strategies {strategies}")
    # a bad CLIP checkpoint fails here, before the model loads and the classifier trains
    clip_scorer = None
    if clip_model and strategies:
        from cm3leon_jax import clip_metrics
        clip_scorer = clip_metrics.ClipScorer(clip_model)
    # a bad feature network fails here too, not after the classifier has trained
    network = shapes_metrics.load_feature_network(feature_network) if feature_network else None
    if workdir_io.is_remote(workdir):  # the model is read from the bucket; the report is for people, here
        if not out_dir:
            raise ValueError(f"workdir {workdir} is an object-store URL: name a local --out for the report")
        classifier_dir = classifier_dir or out_dir
    out_dir = out_dir or os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    gen = Generator(workdir, step=step, int8=int8, compute_dtype=compute_dtype)
    for name, value, used in (("image_neighbours", image_neighbours, strategies),
                              ("caption_neighbours", caption_neighbours, num_captions)):
        if value and used and not gen.can_retrieve:  # before the classifier trains
            raise ValueError(f"{name}={value} needs the data's retriever and index; "
                             f"{workdir} has none (a params bundle carries none)")
    size = gen.vq.image_size
    classifier = attribute_classifier.train_classifier(classifier_dir or workdir, image_size=size,
                                                       steps=classifier_steps, seed=classifier_seed)
    report: dict[str, Any] = {"workdir": workdir_io.resolve(workdir), "step": int(gen.step), "notes": [],
                              "int8": bool(int8), "compute_dtype": gen.model_config.dtype,
                              "classifier": attribute_classifier.classifier_info(classifier_dir or workdir)}

    num_heldout = max(int(num_prompts), int(num_captions))
    prompts = heldout_prompts(num_heldout, size, split=split) if num_heldout else None
    report["prompt_split"] = split
    report["text_to_image"] = {}
    if strategies:
        t2i_prompts = {k: (v[:num_prompts]) for k, v in prompts.items()}
        # the real side is the text -> image prompts' own images, like the other Frechet distances':
        # not the num_captions images that `prompts` may also hold for image -> text
        real_features = attribute_classifier.features(classifier, t2i_prompts["images"])
        clip_real = None if clip_scorer is None else {"images": clip_scorer.image_features(t2i_prompts["images"]),
                                                      "captions": clip_scorer.text_features(t2i_prompts["captions"])}
    totals: dict[str, np.ndarray] = {}
    for name in strategies:
        t0 = time.time()
        scores, grid_rows, totals[name] = text_to_image(
            gen, classifier, t2i_prompts, name, num_samples=num_samples, seed=seed, real_features=real_features,
            feature_network=network, clip_scorer=clip_scorer, clip_real=clip_real, neighbours=image_neighbours,
            sampling_overrides=overrides)
        scores["seconds"] = round(time.time() - t0, 1)
        report["text_to_image"][name] = scores
        image_grid.save_png(os.path.join(out_dir, f"text_to_image_{name}.png"),
                            image_grid.make_grid([list(r) for r in grid_rows[:8]]))
        logging.info("text -> image %s: requested attributes %.1f%% (%.0fs)", name, 100 * scores["requested"],
                     scores["seconds"])
    if strategies:  # "clearly above" or within the noise of this many prompts: paired intervals
        baseline = baseline_strategy or (BASELINE_STRATEGY if BASELINE_STRATEGY in totals else strategies[0])
        report["text_to_image_bootstrap"] = shapes_metrics.bootstrap_comparison(
            totals, baseline if len(totals) > 1 else None, seed=seed)
    if strategies and "topp_cdk_rerank" in strategies and not gen.can_rerank:
        report["notes"].append("no retriever in the data dir: topp_cdk_rerank scored every sample, unranked")
    if strategies:
        report["text_to_image_vq_ceiling"] = vq_ceiling(gen.vq, classifier, t2i_prompts)
        report["text_to_image_prompts"] = t2i_prompts["captions"][:8]
    if clip_scorer is not None:
        from cm3leon_jax import clip_metrics
        real_score = clip_metrics.clip_score_from_features(clip_real["images"], clip_real["captions"])
        report["clip"] = {"model": clip_scorer.model_dir, "real_images_clip_score": real_score}
        reranked = [n for n, s in report["text_to_image"].items() if s.get("reranked")]
        if reranked and gen.clip_scorer is not None and gen.clip_scorer.model_dir == clip_scorer.model_dir:
            report["notes"].append(f"{', '.join(reranked)}: reranked by the CLIP that scores them (the data's "
                                   "retriever), so their CLIP score is biased upward")

    if num_captions:
        images = prompts["images"][:num_captions]
        codes = gen.vq.encode(images)
        retrieved = [gen.retrieve_for_image(c, int(caption_neighbours)) for c in codes]
        captions = gen.caption_codes(codes, retrieved, seed=seed)
        scenes = prompts["scenes"][:num_captions]
        report["image_to_text"] = shapes_metrics.caption_accuracy(scenes, captions)
        report["image_to_text"]["neighbours"] = int(caption_neighbours)
        caption_totals = {"generated": captions}
        if caption_neighbours:  # the control: how much of that a caption copied from the bank would score
            copied = [nearest_caption(gen, docs) for docs in retrieved]
            report["image_to_text_nearest_caption"] = shapes_metrics.caption_accuracy(scenes, copied)
            caption_totals["nearest_caption"] = copied
        caption_totals = {name: shapes_metrics.hit_totals(shapes_metrics.caption_hits(scenes, texts),
                                                          range(len(texts)), len(texts))
                          for name, texts in caption_totals.items()}
        report["image_to_text_bootstrap"] = shapes_metrics.bootstrap_comparison(
            caption_totals, "nearest_caption" if caption_neighbours else None, seed=seed)
        report["image_to_text_examples"] = [{"true": t, "generated": c}
                                            for t, c in zip(prompts["captions"][:8], captions[:8])]
        image_grid.save_png(os.path.join(out_dir, "image_to_text_inputs.png"),
                            image_grid.make_grid([list(images[:8])]))
        logging.info("image -> text: %.1f%% of attributes", 100 * report["image_to_text"]["overall"])

    if num_val_documents and gen.data_dir and os.path.isdir(prepare.documents_dir(gen.data_dir)):
        val_docs = prepare.load_documents(gen.data_dir, "validation")
        docs = [val_docs[i] for i in range(min(int(num_val_documents), len(val_docs)))]
        counts = list(neighbour_counts) if gen.can_retrieve else [0]
        if not gen.can_retrieve:
            report["notes"].append("no retriever in the data dir: validation loss with 0 neighbours only")
        report["validation_loss"], per_document = validation_loss(gen, docs, counts)
        # do neighbours lower the loss beyond the noise of these documents? paired by document
        report["validation_loss_bootstrap"] = shapes_metrics.bootstrap_comparison(
            per_document, str(counts[0]) if len(counts) > 1 else None, seed=seed)
    elif num_val_documents:
        report["notes"].append("no data dir with a validation split: validation loss skipped")

    if num_vq_images:
        vq_images = heldout_prompts(num_vq_images, size, split="validation")["images"]
        report["vq"] = vq_tokenizer.reconstruction_quality(gen.vq, vq_images)
    report["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=float)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(_markdown(report))
    logging.info("wrote %s", os.path.join(out_dir, "report.md"))
    return report


def main(argv):
    del argv
    from absl import flags
    from cm3leon_jax import metrics
    metrics.quiet_library_logs()
    f = flags.FLAGS
    report = evaluate(f.workdir, out_dir=f.out, strategies=f.strategies, num_prompts=f.num_prompts,
                      num_samples=f.num_samples, num_captions=f.num_captions, num_val_documents=f.num_val_documents,
                      neighbour_counts=[int(k) for k in f.neighbour_counts], num_vq_images=f.num_vq_images,
                      classifier_dir=f.classifier_dir, classifier_steps=f.classifier_steps,
                      feature_network=f.feature_network, clip_model=f.clip_model, step=f.step, seed=f.seed,
                      classifier_seed=f.classifier_seed,
                      image_neighbours=f.image_neighbours, cfg_scale=f.cfg_scale, top_p=f.top_p, top_k=f.top_k,
                      temperature=f.temperature, cd_k=f.cd_k, cd_alpha=f.cd_alpha, split=f.split,
                      caption_neighbours=f.caption_neighbours, int8=f.int8, compute_dtype=f.compute_dtype,
                      baseline_strategy=f.baseline_strategy)
    print(_markdown(report))


def _define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "a training workdir (or an exported params bundle)", required=True)
    flags.DEFINE_string("out", None, "where report.json, report.md and the PNG grids go (default WORKDIR/eval)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_list("strategies", list(DEFAULT_STRATEGIES), f"decoding strategies, from {sorted(STRATEGIES)}")
    flags.DEFINE_integer("num_prompts", 64, "held-out captions for text -> image (0: skip)")
    flags.DEFINE_integer("num_samples", 4, "images per caption")
    flags.DEFINE_float("cfg_scale", None, f"guidance scale of the CFG strategies (default {_CFG})")
    flags.DEFINE_float("top_p", None, f"nucleus mass of the TopP strategies (default {_TOP_P})")
    flags.DEFINE_integer("top_k", None, f"k of the TopK strategies (default {_TOP_K})")
    flags.DEFINE_float("temperature", None, "sampling temperature of the sampling strategies (default 1; "
                       "greedy and CD-K keep theirs)")
    flags.DEFINE_integer("cd_k", None, f"k of CD-K's plausible set, in the CD-K strategies and the CD-K share of "
                         f"mixed ones (default {sampling.DEFAULT_CD_K})")
    flags.DEFINE_float("cd_alpha", None, "CD-K plausibility threshold: tokens with p >= cd_alpha * (k-th largest "
                       "p) (default 0.1)")
    flags.DEFINE_enum("split", "test", ["test", "validation"], "shapes-world split of the prompts and images: "
                      "tune decoding settings on validation, report test")
    flags.DEFINE_integer("image_neighbours", 0, "documents retrieved by each caption and prepended to its "
                         "text -> image prompt (the paper's 0, 1 or 2; needs the data's retriever)")
    flags.DEFINE_integer("num_captions", 64, "held-out images for image -> text (0: skip)")
    flags.DEFINE_integer("caption_neighbours", 0, "documents retrieved by each held-out image and prepended to its "
                         "image -> text prompt (needs the data's retriever)")
    flags.DEFINE_integer("num_val_documents", 128, "validation documents for the loss with neighbours (0: skip)")
    flags.DEFINE_list("neighbour_counts", ["0", "1", "2"], "neighbours prepended for the validation loss")
    flags.DEFINE_integer("num_vq_images", 256, "held-out images for the VQ PSNR (0: skip)")
    flags.DEFINE_string("classifier_dir", None, "where the attribute classifier is cached (default WORKDIR)")
    flags.DEFINE_integer("classifier_steps", attribute_classifier.DEFAULT_STEPS, "classifier training steps")
    flags.DEFINE_string("feature_network", None, "optional user network (.npz/.safetensors) for a second "
                        "Frechet distance (e.g. an Inception port for FID)")
    flags.DEFINE_string("clip_model", None, "optional local Hugging Face CLIP checkpoint dir (safetensors): adds "
                        "the CLIP score and a Frechet distance in CLIP image features (needs the interop extra)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("classifier_seed", 0, "the attribute classifier's training seed (apart from --seed, so "
                         "every sampling seed is scored by the same classifier)")
    flags.DEFINE_bool("int8", False, "decode and score with int8 weight-only kernels (quantization.py)")
    flags.DEFINE_string("baseline_strategy", None, "the strategy the paired bootstrap compares the others with "
                        f"(default {BASELINE_STRATEGY} when scored, else the first)")
    from cm3leon_jax.generate import COMPUTE_DTYPES
    flags.DEFINE_enum("compute_dtype", None, list(COMPUTE_DTYPES), "decode and score in this "
                      "activation dtype (default: the training config's)")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
