"""Scores for the shapes world: pure functions on scenes, captions and feature vectors.

Scenes have the structure of `data_pipeline.shapes_world` scenes:
`{"objects": [{"shape", "color", "size", "position", ...}, ...], "background": str}`. The
generated side comes from `attribute_classifier.predict_scenes` (text -> image) or from a
generated caption (image -> text, parsed with `shapes_world.parse_caption`).

Matching rule (both directions): each requested / true object is looked up **at its position**.
`position` scores 1 when the other side has an object in that grid cell, and `shape`, `color`,
`size` score 1 when that object has the same value (0 when the cell is empty). `count` scores 1
per scene when the number of objects matches and `background` when the backgrounds match. Each
attribute's score is its share over all objects (shape, color, size, position) or all scenes
(count, background); `overall` is the unweighted mean of the six attribute shares, and
`all_correct` is the share of scenes with every attribute of every object, the count and the
background right.

Frechet distance: `frechet_distance(features_a, features_b)` is the Frechet (2-Wasserstein)
distance between Gaussians fitted to two feature sets. On shapes-world images the features are
`attribute_classifier.features` (its penultimate layer), so the number is a *Frechet distance in
the attribute classifier's feature space*, not FID: it is only comparable with numbers computed
with the same classifier.

FID and CLIP score need networks trained on natural images (Inception-v3, CLIP), whose weights
cannot be shipped or downloaded here. A user's local CLIP checkpoint gives the CLIP score and a
Frechet distance in CLIP image features (`clip_metrics`, `evaluate --clip_model DIR`). Users who have a
network can still compute a Frechet distance in its feature space: save it as a small conv
feature network in an `.npz` or `.safetensors` file (the convention is in
`load_feature_network`), load it with `load_feature_network(path)`, embed both image sets with
`features_from_network(network, images)` and pass the results to `frechet_distance`. An
Inception or CLIP port can be supplied the same way once it is expressed as that conv stack, or
its features computed elsewhere can be passed to `frechet_distance` directly.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipeline import shapes_world as sw

OBJECT_ATTRIBUTES = ("shape", "color", "size", "position")
SCENE_ATTRIBUTES = ("count", "background")
SCORED_ATTRIBUTES = OBJECT_ATTRIBUTES + SCENE_ATTRIBUTES


# --------------------------------------------------------------------------- scene matching


def _objects_by_position(objects: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The first object named at each position (later duplicates are ignored)."""
    out: dict[str, Mapping[str, Any]] = {}
    for obj in objects:
        out.setdefault(obj["position"], obj)
    return out


def scene_hits(reference: Mapping[str, Any], candidate_objects: Sequence[Mapping[str, Any]] | None,
               candidate_background: str | None) -> dict[str, list[float]]:
    """Per-attribute hits (1.0 / 0.0) of one candidate against one reference scene: one entry per
    reference object for shape/color/size/position, one per scene for count/background.
    `candidate_objects=None` means the candidate could not be read: everything scores 0."""
    hits: dict[str, list[float]] = {k: [] for k in SCORED_ATTRIBUTES}
    ref_objects = list(reference["objects"])
    found = _objects_by_position(candidate_objects) if candidate_objects is not None else {}
    for obj in ref_objects:
        other = found.get(obj["position"])
        hits["position"].append(float(other is not None))
        for key in ("shape", "color", "size"):
            hits[key].append(float(other is not None and other[key] == obj[key]))
    if candidate_objects is None:
        hits["count"].append(0.0)
        hits["background"].append(0.0)
    else:
        hits["count"].append(float(len(candidate_objects) == len(ref_objects)))
        hits["background"].append(float(candidate_background == reference["background"]))
    return hits


def summarise_hits(all_hits: Sequence[Mapping[str, list[float]]]) -> dict[str, float]:
    """Per-attribute shares, `overall`, `all_correct` and the counts from `scene_hits` results."""
    totals = {k: [] for k in SCORED_ATTRIBUTES}
    exact = []
    for hits in all_hits:
        for k in SCORED_ATTRIBUTES:
            totals[k].extend(hits[k])
        exact.append(all(v == 1.0 for k in SCORED_ATTRIBUTES for v in hits[k]))
    out = {k: (float(np.mean(v)) if v else float("nan")) for k, v in totals.items()}
    out["overall"] = float(np.mean([out[k] for k in SCORED_ATTRIBUTES])) if all_hits else float("nan")
    out["all_correct"] = float(np.mean(exact)) if exact else float("nan")
    out["num_scenes"] = len(all_hits)
    out["num_objects"] = len(totals["position"])
    return out


def image_hits(requested_scenes: Sequence[Mapping[str, Any]],
               predicted_scenes: Sequence[Mapping[str, Any]]) -> list[dict[str, list[float]]]:
    """`scene_hits` of each generated image (as the attribute classifier read it) against its request."""
    _check_lengths(requested_scenes, predicted_scenes, "requested_scenes and predicted_scenes")
    return [scene_hits(req, pred["objects"], pred["background"])
            for req, pred in zip(requested_scenes, predicted_scenes)]


def hit_totals(all_hits: Sequence[Mapping[str, list[float]]], groups: Sequence[int], num_groups: int,
               attributes: Sequence[str] = SCORED_ATTRIBUTES) -> np.ndarray:
    """Hits and trials of each attribute summed per group (a prompt's samples form one group):
    [num_groups, len(attributes), 2]. The unit a bootstrap resamples, since samples of one prompt
    are not independent of each other; `share_of_totals` turns them back into the shares of
    `text_to_image_faithfulness` / `caption_accuracy`."""
    _check_lengths(all_hits, groups, "hits and groups")
    totals = np.zeros((int(num_groups), len(attributes), 2))
    for hits, g in zip(all_hits, groups):
        for a, key in enumerate(attributes):
            totals[g, a] += (sum(hits[key]), len(hits[key]))
    return totals


def share_of_totals(totals: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean over attributes of each attribute's share (hits / trials) from `hit_totals`; `weights`
    [R, groups] (how often each group is drawn, per resample) gives one figure per resample."""
    totals = np.asarray(totals, np.float64)
    w = np.ones((1, totals.shape[0])) if weights is None else np.asarray(weights, np.float64)
    hits, trials = w @ totals[..., 0], w @ totals[..., 1]  # [R, attributes]
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.nanmean(np.where(trials > 0, hits / np.maximum(trials, 1e-12), np.nan), axis=-1)
    return shares if weights is not None else shares[0]


def bootstrap_comparison(totals: Mapping[str, np.ndarray], baseline: str | None = None, *,
                         num_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Percentile-bootstrap intervals over prompts (or captioned images) for each strategy's share
    and, paired (the same resampled prompts for both), for its difference from `baseline`: is one
    strategy "clearly above" another, or within the noise of this many prompts? `totals`:
    `hit_totals` per strategy, all over the same prompts. `above_baseline` is the share of
    resamples where the difference is positive, ties counting half (0.5: no evidence either way;
    shares of a few prompts tie often, and two equal strategies used to read 0.0, as if clearly below)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if int(num_resamples) < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    shapes = {name: np.shape(t) for name, t in totals.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"every strategy must be scored on the same prompts and attributes, got {shapes}")
    if baseline is not None and baseline not in totals:
        raise ValueError(f"baseline {baseline!r} is not among the strategies {sorted(totals)}")
    if not totals:
        return {"level": level, "num_resamples": int(num_resamples), "shares": {}, "differences": {}}
    num_groups = next(iter(shapes.values()))[0]
    if num_groups < 1:   # resampling nothing divided by zero (a ZeroDivisionError from the weights)
        raise ValueError("bootstrap_comparison needs at least one prompt (or image, document) per strategy, got 0")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(num_groups, np.full(num_groups, 1.0 / num_groups), size=int(num_resamples))
    tails = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    point = {name: float(share_of_totals(t)) for name, t in totals.items()}
    resampled = {name: share_of_totals(t, weights) for name, t in totals.items()}
    out: dict[str, Any] = {"level": level, "num_resamples": int(num_resamples), "num_items": int(num_groups),
                           "baseline": baseline, "shares": {}, "differences": {}}
    for name in totals:
        out["shares"][name] = {"share": point[name],
                               "interval": [float(v) for v in np.percentile(resampled[name], tails)]}
        if baseline is not None and name != baseline:
            diff = resampled[name] - resampled[baseline]
            out["differences"][name] = {"difference": point[name] - point[baseline],
                                        "interval": [float(v) for v in np.percentile(diff, tails)],
                                        "above_baseline": above_share(diff)}
    return out


def above_share(differences: np.ndarray, tolerance: float = 1e-12) -> float:
    """Share of differences above 0, a tie (|d| <= tolerance: float rounding) counting half."""
    d = np.asarray(differences, np.float64)
    tie = np.abs(d) <= tolerance
    return float(np.mean((d > 0) & ~tie) + 0.5 * np.mean(tie))


def _check_lengths(a: Sequence, b: Sequence, names: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names}: got {len(a)} and {len(b)}; they must pair up one to one")


def text_to_image_faithfulness(requested_scenes: Sequence[Mapping[str, Any]],
                               predicted_scenes: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Share of the requested attributes present in the generated images.

    `requested_scenes[i]` is what caption i asked for; `predicted_scenes[i]` is what the
    attribute classifier read from the image generated for it. Returns shares per attribute
    (shape, color, size, position: over requested objects; count, background: over scenes),
    `overall` (mean of the six), `all_correct`, `num_scenes`, `num_objects`.
    """
    return summarise_hits(image_hits(requested_scenes, predicted_scenes))


def caption_accuracy(true_scenes: Sequence[Mapping[str, Any]], captions: Sequence[str]) -> dict[str, float]:
    """Share of the true attributes named correctly in generated captions.

    Each caption is parsed with `shapes_world.parse_caption` (objects) and `parse_background`;
    a caption that does not parse scores 0 for every attribute of its scene (object attributes,
    count and background) and is counted in `unparseable` (a share of captions). Otherwise the
    same position-anchored matching as `text_to_image_faithfulness` applies, and a number of objects
    the caption states ("two shapes") must be the true one for its count to score.
    """
    out = summarise_hits(caption_hits(true_scenes, captions))
    bad = sum(_read_caption(caption)[0] is None for caption in captions)
    out["unparseable"] = bad / len(captions) if captions else float("nan")
    return out


def _read_caption(caption: str) -> tuple[list | None, str | None]:
    """(objects, background) a caption names; (None, None) when it does not parse."""
    try:
        objects = sw.parse_caption(caption)
    except (ValueError, TypeError, AttributeError):
        return None, None
    return objects, sw.parse_background(caption)


def caption_hits(true_scenes: Sequence[Mapping[str, Any]], captions: Sequence[str]) -> list[dict[str, list[float]]]:
    """`scene_hits` of each caption (parsed) against its image's true scene. A caption that states a
    number of objects (`shapes_world.parse_count`) other than the true one gets count 0, whatever it
    lists ("three shapes: <two objects>" used to score its count right)."""
    _check_lengths(true_scenes, captions, "true_scenes and captions")
    out = []
    for scene, caption in zip(true_scenes, captions):
        hits = scene_hits(scene, *_read_caption(caption))
        stated = sw.parse_count(caption) if isinstance(caption, str) else None
        if stated is not None and stated != len(scene["objects"]):
            hits["count"] = [0.0]
        out.append(hits)
    return out


# --------------------------------------------------------------------------- instruction-tuned tasks


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: what VQA exact match compares."""
    return " ".join(str(text).lower().split()).strip(" .!?,;:")


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions equal to their answer after `normalize_answer`."""
    _check_lengths(predictions, answers, "predictions and answers")
    if not answers:
        return float("nan")
    return float(np.mean([normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]))


def edit_success(after: Mapping[str, Any], edit: Mapping[str, Any], predicted: Mapping[str, Any]) -> dict[str, float]:
    """One edit, read back from the generated image (`predicted`, e.g. by the attribute classifier).

    `changed`: the requested change is there (recolor: the object has the new colour and its
    shape; move: the shape is in the new cell and the old cell is empty; remove: its cell is empty).
    `kept`: every other object of the true after-scene is in its cell with its shape, colour and
    size, no object appears elsewhere, and the background is unchanged. `success` = both.
    """
    found = _objects_by_position(predicted["objects"])
    kind, position = edit["kind"], edit["position"]
    if kind == "recolor":
        obj = found.get(position)
        changed = obj is not None and obj["shape"] == edit["shape"] and obj["color"] == edit["color"]
    elif kind == "move":
        obj = found.get(edit["to"])
        changed = obj is not None and obj["shape"] == edit["shape"] and position not in found
    elif kind == "remove":
        changed = position not in found
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    touched = {position, edit.get("to")}
    others = [o for o in after["objects"] if o["position"] not in touched]
    kept = predicted["background"] == after["background"] and all(
        o["position"] in found and all(found[o["position"]][k] == o[k] for k in ("shape", "color", "size"))
        for o in others)
    allowed = {o["position"] for o in after["objects"]} | touched
    kept = kept and set(found) <= allowed
    return {"changed": float(changed), "kept": float(kept), "success": float(changed and kept)}


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = np.array(mask, bool)
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def edge_f1(predicted: np.ndarray, reference: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two edge maps (bool [S, S]) where an edge pixel counts as matched when the other map
    has an edge within `tolerance` pixels (4-neighbour steps). Both empty: 1."""
    p, r = np.asarray(predicted, bool), np.asarray(reference, bool)
    if p.shape != r.shape:
        raise ValueError(f"edge maps differ in shape: {p.shape} vs {r.shape}")
    if not p.any() and not r.any():
        return 1.0
    if not p.any() or not r.any():
        return 0.0
    precision = float(np.mean(_dilate(r, tolerance)[p]))
    recall = float(np.mean(_dilate(p, tolerance)[r]))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def class_map_accuracy(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-pixel accuracy of a class map, and on the reference's object pixels only (the share of
    object pixels given their shape's class; all-background guesses score 0 there)."""
    p, r = np.asarray(predicted), np.asarray(reference)
    if p.shape != r.shape:
        raise ValueError(f"class maps differ in shape: {p.shape} vs {r.shape}")
    objects = r > 0
    return {"pixel_accuracy": float(np.mean(p == r)),
            "object_pixel_accuracy": float(np.mean(p[objects] == r[objects])) if objects.any() else float("nan")}


def class_map_from_image(image: np.ndarray, cell_shapes: Sequence[int], threshold: float = 60.0) -> np.ndarray:
    """The class map an image shows: pixels far (RGB distance > threshold) from the background
    colour (the median of the border pixels) get the class (1 + shape index, 0 = empty) of their
    grid cell, e.g. from `attribute_classifier.predict_classes(...)["shape"]` (same indexing)."""
    x = np.asarray(image, np.float32)
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    foreground = np.sqrt(np.square(x - np.median(border, axis=0)).sum(-1)) > threshold
    size = x.shape[0]
    out = np.zeros(x.shape[:2], np.uint8)
    for c, shape in enumerate(cell_shapes):
        top, bottom, left, right = sw.cell_bounds(sw.POSITIONS[c], size)
        out[top:bottom, left:right] = np.where(foreground[top:bottom, left:right], int(shape), 0)
    return out


# --------------------------------------------------------------------------- Frechet distance


def sample_diversity(samples_per_prompt: Sequence[np.ndarray]) -> float:
    """Mean absolute pixel difference (0..1) between two samples of the same prompt, averaged over
    prompts: 0 when a decoder always draws the same image (greedy), as contrastive decoding does when
    its plausible set collapses to one token. Prompts with fewer than two samples are left out."""
    per_prompt = []
    for images in samples_per_prompt:
        x = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0
        if len(x) < 2:
            continue
        pairs = [np.abs(x[i] - x[j]).mean() for i in range(len(x)) for j in range(i + 1, len(x))]
        per_prompt.append(np.mean(pairs))
    return float(np.mean(per_prompt)) if per_prompt else 0.0


def _mean_cov(features) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or inf")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)).

    tr (C_a C_b)^(1/2) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix C_a^(1/2) C_b C_a^(1/2) (same spectrum as C_a C_b), clipped at 0: no
    complex parts, no failure on singular covariances (N < D), and symmetric up to rounding.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape} vs {mu_b.shape}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ([N_a, D] and [N_b, D]).

    With `attribute_classifier.features` this is a Frechet distance in the attribute
    classifier's feature space (report it under that name; it is not FID)."""
    mu_a, cov_a = _mean_cov(features_a)
    mu_b, cov_b = _mean_cov(features_b)
    return frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)


# --------------------------------------------------------------------------- user feature networks

_CONV_KEY = re.compile(r"^conv(\d+)[./](kernel|bias|weight)$")


def load_feature_network(weights_path: str) -> dict[str, Any]:
    """Loads a user-supplied conv feature network from `.npz` or `.safetensors`.

    Convention (a tiny VGG-style stack; arrays by name):
      conv{i}/kernel  [kh, kw, c_in, c_out]  (HWIO, Flax/JAX layout), or
      conv{i}.weight  [c_out, c_in, kh, kw]  (OIHW, PyTorch layout; transposed on load)
      conv{i}/bias or conv{i}.bias  [c_out]  (optional, zeros if absent)
      input_mean, input_std  [3]  (optional; applied to images scaled to [0, 1])
      input_size  scalar          (optional; images are resized to input_size x input_size)
    for i = 0, 1, ..., L-1 (consecutive). Layer i: 'same'-padded stride-1 convolution + bias +
    ReLU, then 2x2 max pooling after every layer but the last; the features are the global
    average of the last layer's activations, [N, c_out of the last layer].
    Returns {"layers": [(kernel HWIO float32, bias float32), ...], "mean", "std", "input_size"}.
    """
    if not os.path.exists(weights_path):
        raise FileNotFoundError(weights_path)
    if weights_path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        arrays = dict(load_file(weights_path))
    elif weights_path.endswith(".npz"):
        with np.load(weights_path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        raise ValueError(f"{weights_path}: expected a .npz or .safetensors file")
    kernels: dict[int, np.ndarray] = {}
    biases: dict[int, np.ndarray] = {}
    for name, value in arrays.items():
        m = _CONV_KEY.match(name)
        if not m:
            continue
        i, kind = int(m.group(1)), m.group(2)
        value = np.asarray(value, np.float32)
        if kind == "weight" and value.ndim == 4:
            kernels[i] = value.transpose(2, 3, 1, 0)   # OIHW -> HWIO
        elif kind == "kernel":
            kernels[i] = value
        else:
            biases[i] = value.reshape(-1)
    if not kernels:
        raise ValueError(f"{weights_path}: no conv{{i}}/kernel or conv{{i}}.weight arrays found")
    if sorted(kernels) != list(range(len(kernels))):
        raise ValueError(f"{weights_path}: conv layers must be numbered 0..L-1, got {sorted(kernels)}")
    layers, c_in = [], 3
    for i in range(len(kernels)):
        k = kernels[i]
        if k.ndim != 4 or k.shape[2] != c_in:
            raise ValueError(f"{weights_path}: conv{i} kernel {k.shape} does not take {c_in} input channels")
        b = biases.get(i, np.zeros((k.shape[3],), np.float32))
        if b.shape != (k.shape[3],):
            raise ValueError(f"{weights_path}: conv{i} bias {b.shape} does not match {k.shape[3]} outputs")
        layers.append((k, b))
        c_in = k.shape[3]
    mean = np.asarray(arrays.get("input_mean", np.zeros(3)), np.float32).reshape(3)
    std = np.asarray(arrays.get("input_std", np.ones(3)), np.float32).reshape(3)
    size = int(np.asarray(arrays["input_size"]).reshape(())) if "input_size" in arrays else None
    return {"layers": layers, "mean": mean, "std": std, "input_size": size}


def network_features(layers, mean, std, x):
    """Pure JAX forward of a loaded feature network on float images [N, H, W, 3] in [0, 1]."""
    import jax
    import jax.numpy as jnp
    x = (x - mean) / std
    for i, (kernel, bias) in enumerate(layers):
        x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + bias)
        if i < len(layers) - 1:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return x.mean(axis=(1, 2))


def features_from_network(network: Mapping[str, Any], images, batch_size: int = 64) -> np.ndarray:
    """Features float32 [N, D] of images (uint8 [N, H, W, 3], or float in [0, 1]) under a network
    from `load_feature_network`."""
    import jax
    import jax.numpy as jnp
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    size = network.get("input_size")
    layers = [(jnp.asarray(k), jnp.asarray(b)) for k, b in network["layers"]]

    @jax.jit
    def run(x):
        x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        if size is not None and x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "linear")
        return network_features(layers, jnp.asarray(network["mean"]), jnp.asarray(network["std"]), x)

    out = [np.asarray(run(images[i:i + batch_size]), np.float32) for i in range(0, len(images), batch_size)]
    dim = network["layers"][-1][0].shape[3]
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)
