"""The built-in dataset: determinism, disjoint splits, captions that carry the attributes."""

import numpy as np
import pytest

from data_pipeline import shapes_world as sw

CFG = sw.ShapesWorldConfig()


def _attrs(objects):
    return sorted(({k: o[k] for k in sw.ATTRIBUTES} for o in objects), key=lambda o: o["position"])


def test_same_seed_split_index_gives_identical_example():
    for i in (0, 1, 17, 999_999):
        a = sw.example("train", i, CFG)
        b = sw.example("train", i, sw.ShapesWorldConfig(seed=0))
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["caption"] == b["caption"] and a["objects"] == b["objects"]
        assert a["background"] == b["background"] and a["index"] == i
    src = sw.ShapesWorld(CFG, "validation")
    assert src[5]["image"].tobytes() == sw.example("validation", 5, CFG)["image"].tobytes()


def test_different_seeds_and_splits_differ():
    def captions(split, seed):
        return [sw.scene_and_caption(split, i, sw.ShapesWorldConfig(seed=seed))[1] for i in range(20)]

    base = captions("train", 0)
    for other in (captions("train", 1), captions("validation", 0), captions("test", 0)):
        assert sum(a != b for a, b in zip(base, other)) >= 18
    assert len(set(base)) == 20


def test_splits_are_disjoint_by_content():
    sigs = {}
    for split, n in (("train", 300), ("validation", 150), ("test", 150)):
        scenes = [sw.scene_and_caption(split, i, CFG)[0] for i in range(n)]
        assert all(sw.scene_split(s) == split for s in scenes)
        sigs[split] = {sw.scene_signature(s) for s in scenes}
    assert not sigs["train"] & sigs["validation"]
    assert not sigs["train"] & sigs["test"]
    assert not sigs["validation"] & sigs["test"]


def test_captions_recover_attributes_across_templates():
    markers = {"background:": 0, "an image of": 0, "There ": 0, " on ": 0, "background with": 0}
    counts, shapes, colors = set(), set(), set()
    for i in range(400):
        scene, caption = sw.scene_and_caption("train", i, CFG)
        assert _attrs(sw.parse_caption(caption)) == _attrs(scene["objects"]), caption
        assert sw.parse_background(caption) == scene["background"], caption
        for m in markers:
            markers[m] += m in caption
        counts.add(len(scene["objects"]))
        shapes |= {o["shape"] for o in scene["objects"]}
        colors |= {o["color"] for o in scene["objects"]}
        positions = [o["position"] for o in scene["objects"]]
        assert len(set(positions)) == len(positions)
    assert all(v > 0 for v in markers.values()), markers
    assert counts == {1, 2, 3}
    assert shapes == set(sw.SHAPES) and colors == set(sw.COLORS)
    assert len(sw.COLORS) >= 8 and len(sw.SHAPES) >= 7 and len(sw.POSITIONS) == 9


def test_parse_caption_rejects_incomplete_descriptions():
    with pytest.raises(ValueError):
        sw.parse_caption("a red circle on a black background")  # no size, no position
    with pytest.raises(ValueError):
        sw.parse_caption("a small red circle at the top and a blue square at the left")
    with pytest.raises(ValueError):
        sw.parse_caption("nothing to see here")
    assert sw.parse_caption("A BIG Pink Star in the middle") == [
        {"shape": "star", "color": "pink", "size": "large", "position": "center"}]


def _check_pixels(ex, size):
    img = ex["image"]
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    for o in ex["objects"]:
        x, y = sw.object_center(o, size)
        assert tuple(img[int(y), int(x)]) == sw.COLORS[o["color"]], (o, ex["caption"])
    used = {o["position"] for o in ex["objects"]}
    bg = np.array(sw.BACKGROUNDS[ex["background"]], np.uint8)
    c = size / 3
    for k, pos in enumerate(sw.POSITIONS):
        if pos in used:
            continue
        r, q = divmod(k, 3)
        cell = img[int(r * c) + 1:int((r + 1) * c) - 1, int(q * c) + 1:int((q + 1) * c) - 1]
        assert (cell == bg).all(), (pos, ex["caption"])


def test_rendered_objects_have_their_colour_at_their_position():
    for i in range(60):
        _check_pixels(sw.example("test", i, CFG), 64)


def test_image_size_is_configurable_and_scene_independent_of_it():
    for size in (16, 40, 100):
        cfg = sw.ShapesWorldConfig(image_size=size)
        ex = sw.example("train", 3, cfg)
        assert ex["image"].shape == (size, size, 3)
        assert ex["caption"] == sw.example("train", 3, CFG)["caption"]
        if size >= 40:
            _check_pixels(ex, size)
    with pytest.raises(ValueError):
        sw.ShapesWorldConfig(image_size=8)
    with pytest.raises(ValueError):
        sw.ShapesWorldConfig(max_objects=10)


def test_sizes_and_shapes_render_differently():
    def pixels(shape, size):
        scene = {"background": "black",
                 "objects": [{"shape": shape, "color": "red", "size": size, "position": "center"}]}
        return (sw.render(scene, 64) == np.array(sw.COLORS["red"], np.uint8)).all(-1)

    masks = {}
    for shape in sw.SHAPES:
        small, large = pixels(shape, "small").sum(), pixels(shape, "large").sum()
        assert large > 2 * small > 0, shape
        masks[shape] = pixels(shape, "large")
    for a in sw.SHAPES:
        for b in sw.SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 20, (a, b)


def test_object_count_range_and_source_protocol():
    cfg = sw.ShapesWorldConfig(min_objects=3, max_objects=3, seed=7)
    src = sw.ShapesWorld(cfg, "train", size=10)
    assert len(src) == 10 and len(sw.ShapesWorld(CFG, "test")) == sw.DEFAULT_SPLIT_SIZES["test"]
    assert all(len(src[i]["objects"]) == 3 for i in range(10))
    assert src[-1]["index"] == 9
    with pytest.raises(IndexError):
        src[10]
    with pytest.raises(ValueError):
        sw.ShapesWorld(CFG, "dev")
    grain = pytest.importorskip("grain")
    ds = grain.MapDataset.source(src)
    assert ds[2]["caption"] == src[2]["caption"]
