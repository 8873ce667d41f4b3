"""The web UI's pure functions (regiondrag.ui_state) and its wiring, without a browser."""
import numpy as np
import pytest
from PIL import Image

import regiondrag.ui_state as us
from regiondrag.dragfile import load_drag
from regiondrag.drags import PolygonPairs, RegionPairs, RegionPoints

H, W = 384, 512


def box(y0, y1, x0, x1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture
def state():
    rng = np.random.default_rng(0)
    return us.new_state(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))


def regions(state, *masks):
    for m in masks:
        state = us.add_region(state, m)
    return state


def vertices(state, *points):
    for p in points:
        state = us.add_vertex(state, p)
    return state


# ------------------------------------------------------------------------------------------ image
@pytest.mark.parametrize("hw,fitted", [
    ((150, 200), (384, 512)), ((200, 150), (512, 384)), ((1000, 1000), (512, 512)),
    ((100, 333), (152, 512)),  # 512 / 3.33 = 153.7 -> 153 -> rounded DOWN to 152
    ((333, 100), (512, 152)), ((512, 700), (368, 512)), ((3, 1000), (8, 512)),
])
def test_fit_size_long_side_512_multiples_of_8_rounded_down(hw, fitted):
    assert us.fit_size(*hw) == fitted


def test_fit_image_accepts_pil_rgba_and_gray():
    rgba = np.zeros((150, 200, 4), np.uint8)
    rgba[..., 0] = 200
    out = us.fit_image(rgba)
    assert out.shape == (384, 512, 3) and out.dtype == np.uint8 and (out[..., 0] == 200).all()
    assert us.fit_image(np.zeros((40, 30), np.uint8)).shape == (512, 384, 3)
    assert us.fit_image(Image.new("RGB", (64, 64), (1, 2, 3)))[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="RGB image"):
        us.fit_image(np.zeros((4, 4, 2), np.uint8))


def test_new_state_records_the_uploaded_size(state):
    assert state.image.shape == (H, W, 3) and state.meta["uploaded"] == (150, 200)
    assert us.new_state(state.image, shape=3).shape == 3


def test_editor_mask_unions_layer_alpha_and_resizes():
    layer = np.zeros((H, W, 4), np.uint8)
    layer[10:20, 30:40, 3] = 255
    layer2 = np.zeros((H, W, 4), np.uint8)
    layer2[100, 100, 3] = 1  # anti-aliased edge pixels count
    value = {"background": np.zeros((H, W, 4), np.uint8), "layers": [layer, layer2], "composite": None}
    mask = us.editor_mask(value, (H, W))
    assert mask.dtype == np.uint8 and mask.sum() == 101 and mask[15, 35] == 1 and mask[100, 100] == 1
    assert us.editor_mask({"layers": [layer[::2, ::2]]}, (H, W)).sum() == 100  # half size -> nearest
    assert us.editor_mask(None, (H, W)).sum() == 0
    assert us.editor_mask({"background": None, "layers": [], "composite": None}, (H, W)).sum() == 0
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    assert us.editor_mask({"layers": [rgb, None]}, (H, W)).sum() == 1


def test_editor_shows_only_its_current_background(state):
    """A value read over an earlier background (before Add/Undo/Clear reached the browser) is stale."""
    shown = us.render(state, "region_pairs")
    value = {"background": np.dstack([shown, np.full((H, W), 255, np.uint8)]), "layers": [], "composite": None}
    assert us.editor_shows(value, shown)
    after_add = us.render(regions(state, box(100, 150, 100, 160)), "region_pairs")  # the new region tinted
    assert not us.editor_shows(value, after_add)
    assert not us.editor_shows({"background": shown[::2, ::2]}, shown)
    assert not us.editor_shows({"background": None, "layers": []}, shown)
    assert not us.editor_shows(None, shown)


# ------------------------------------------------------------------------------------ region pairs
def test_regions_alternate_handle_and_target(state):
    handle, target = box(100, 150, 100, 160), box(100, 150, 300, 380)
    st = regions(state, handle)
    assert us.role_of(0) == "handle" and us.role_of(1) == "target"
    with pytest.raises(ValueError, match="no target yet"):
        us.build_drag(st, "region_pairs")
    assert "handle region 1 has no target yet" in us.pending_note(st, "region_pairs")
    st = regions(st, target)
    drag = us.build_drag(st, "region_pairs")
    assert isinstance(drag, RegionPairs) and len(drag.sources) == 1
    np.testing.assert_array_equal(drag.sources[0], handle)
    np.testing.assert_array_equal(drag.targets[0], target)
    assert us.pending_note(st, "region_pairs") is None
    # a third mask is an unpaired handle: left out of the drag, with a note
    st3 = regions(st, box(200, 250, 100, 160))
    assert len(us.build_drag(st3, "region_pairs").sources) == 1
    assert "handle region 2" in us.pending_note(st3, "region_pairs")
    assert len(us.undo_region(st3).masks) == 2 and us.clear_regions(st3).masks == ()
    assert len(st.masks) == 2  # states are immutable


def test_add_region_refuses_empty_wrong_size_and_no_image(state):
    with pytest.raises(ValueError, match="nothing drawn: paint the handle region"):
        us.add_region(state, np.zeros((H, W)))
    with pytest.raises(ValueError, match="the drawn region: mask size 10x10"):
        us.add_region(state, np.ones((10, 10)))
    with pytest.raises(ValueError, match="upload an image first"):
        us.add_region(us.DragState(), np.ones((H, W)))
    with pytest.raises(ValueError, match="nothing to drag yet"):
        us.build_drag(state, "region_pairs")
    with pytest.raises(ValueError, match="unknown mode"):
        us.build_drag(state, "lasso")


def test_preview_is_the_drags_copy_paste(state):
    st = regions(state, box(100, 150, 100, 160), box(100, 150, 300, 380))
    img, why = us.preview(st, "region_pairs")
    assert why is None
    np.testing.assert_array_equal(img, us.build_drag(st, "region_pairs").preview(st.image))
    assert not np.array_equal(img, st.image)
    img, why = us.preview(state, "region_pairs")  # nothing drawn: the image and the reason
    assert img is state.image and "nothing to drag yet" in why
    assert us.preview(us.DragState(), "region_pairs") == (None, "upload an image first")


def test_non_column_convex_handle_gives_a_message_not_a_crash(state):
    handle = box(100, 150, 100, 120) | box(100, 150, 200, 220)  # a gap between columns 120 and 200
    st = regions(state, handle, box(100, 150, 300, 420))
    img, why = us.preview(st, "region_pairs")
    assert img is st.image and "column-convex" in why


# ------------------------------------------------------------------------------------ polygons
def test_quadrilateral_pair_and_numbering(state):
    st = vertices(state, (100, 100), (200, 100), (200, 200), (100, 200))
    assert "4 more target vertices" in us.pending_note(st, "polygon_pairs")
    st = vertices(st, (300, 100), (400, 100), (400, 200))
    assert "1 more target vertex" in us.pending_note(st, "polygon_pairs")
    st = vertices(st, (300, 200))
    drag = us.build_drag(st, "polygon_pairs")
    assert isinstance(drag, PolygonPairs)
    assert drag.sources[0].tolist() == [[100, 100], [200, 100], [200, 200], [100, 200]]
    assert drag.targets[0].tolist() == [[300, 100], [400, 100], [400, 200], [300, 200]]
    st2 = vertices(st, (10, 10))  # a second pair starts
    assert len(st2.polygons) == 2 and len(us.build_drag(st2, "polygon_pairs").sources) == 1
    assert us.undo_vertex(st2).polygons == st.polygons
    assert us.undo_vertex(us.clear_polygons(st2)).polygons == ()


@pytest.mark.parametrize("points,match", [
    (((100, 100), (200, 100), (100, 200), (200, 200)), "self-intersecting"),  # bow tie
    (((100, 100), (200, 100), (300, 100), (100, 200)), "degenerate"),  # three collinear
    (((100, 100), (200, 100), (200, 100), (100, 200)), "degenerate"),  # repeated vertex
])
def test_invalid_quadrilateral_vertex_is_refused_and_state_kept(state, points, match):
    st = vertices(state, *points[:3])
    with pytest.raises(ValueError, match=f"handle polygon 1 refused: .*{match}"):
        us.add_vertex(st, points[3])
    assert len(st.polygons[0][1]) == 3


def test_target_must_match_handle_convexity(state):
    st = vertices(state, (100, 100), (200, 100), (200, 200), (100, 200))  # convex handle
    st = vertices(st, (300, 100), (400, 100), (330, 130))
    with pytest.raises(ValueError, match="target polygon 1 refused: .*convex"):
        us.add_vertex(st, (300, 200))  # a concave (dart) target


def test_triangles_and_shape_switch(state):
    st = us.set_shape(state, 3)
    st = vertices(st, (10, 10), (100, 10), (10, 100), (200, 10), (300, 10), (200, 100))
    assert st.polygons[0][0] == 3 and isinstance(us.build_drag(st, "polygon_pairs"), PolygonPairs)
    with pytest.raises(ValueError, match="degenerate"):
        vertices(us.set_shape(state, 3), (10, 10), (20, 20), (30, 30))
    # switching while the handle is unfinished reshapes it; once complete, only new pairs change
    st = vertices(state, (10, 10), (100, 10), (100, 100))
    assert us.set_shape(st, 3).polygons[0] == (3, ((10, 10), (100, 10), (100, 100)))
    done = vertices(state, (10, 10), (100, 10), (100, 100), (10, 100))
    assert us.set_shape(done, 3).polygons == done.polygons and us.set_shape(done, 3).shape == 3
    with pytest.raises(ValueError, match="3 .* or 4"):
        us.set_shape(state, 5)


def test_clicks_outside_the_image_are_refused(state):
    with pytest.raises(ValueError, match="outside the 512x384 image"):
        us.add_vertex(state, (512, 0))
    with pytest.raises(ValueError, match="outside"):
        us.add_point(state, (-1, 5))


# ------------------------------------------------------------------------------------ region + points
def test_region_points(state):
    with pytest.raises(ValueError, match="draw the region to move"):
        us.build_drag(state, "region_points")
    st = us.set_region(state, box(100, 200, 100, 200))
    with pytest.raises(ValueError, match="click a handle point"):
        us.build_drag(st, "region_points")
    st = us.add_point(st, (150, 150))
    assert "handle point 1 has no target" in us.pending_note(st, "region_points")
    st = us.add_point(st, (250, 180))
    drag = us.build_drag(st, "region_points")
    assert isinstance(drag, RegionPoints) and drag.handles.tolist() == [[150, 150]]
    assert drag.targets.tolist() == [[250, 180]]
    img, why = us.preview(st, "region_points")
    assert why is None and img.shape == (H, W, 3)
    assert us.undo_point(st).points == ((150, 150),)
    cleared = us.clear_points(st)
    assert cleared.points == () and cleared.region is None
    assert us.set_region(st, np.zeros((H, W))).region is None


def test_handle_outside_region_explains(state):
    st = us.set_region(state, box(100, 200, 100, 200))
    st = us.add_point(us.add_point(st, (400, 300)), (450, 300))
    img, why = us.preview(st, "region_points")
    assert img is st.image and "handle 0 at (400, 300) lies outside the region" in why


# ------------------------------------------------------------------------------------ drawing
def test_render_tints_handles_red_and_targets_blue(state):
    flat = us.DragState(image=np.full((H, W, 3), 100, np.uint8))
    st = regions(flat, box(100, 150, 100, 160), box(100, 150, 300, 380))
    out = us.render(st, "region_pairs")
    assert out[125, 130].tolist() == [146, 70, 70]  # 0.7*100 + 0.3*255 = 146.5 -> 146
    assert out[125, 340].tolist() == [70, 70, 146]
    assert out[100, 130].tolist() == [255, 0, 0]  # outline in the region's colour
    assert out[300, 300].tolist() == [100, 100, 100]
    assert us.render(us.DragState(), "region_pairs") is None
    with pytest.raises(ValueError, match="unknown mode"):
        us.render(st, "lasso")


def test_render_polygons_and_points_draw_markers(state):
    flat = us.DragState(image=np.full((H, W, 3), 100, np.uint8))
    st = vertices(flat, (100, 100), (200, 100), (200, 200), (100, 200), (300, 100))
    out = us.render(st, "polygon_pairs")
    assert out[150, 150].tolist() == [146, 70, 70]  # complete handle polygon tinted red
    assert tuple(out[100, 108]) != (100, 100, 100)  # a numbered marker around each vertex
    assert tuple(out[100, 292]) != (100, 100, 100)
    st = us.add_point(us.add_point(us.set_region(flat, box(100, 200, 100, 200)), (150, 150)), (300, 150))
    out = us.render(st, "region_points")
    assert out[150, 150].tolist() == [255, 0, 0] and out[150, 300].tolist() == [0, 0, 255]
    assert out[150, 250].tolist() == [255, 255, 255]  # the arrow


# ------------------------------------------------------------------------------------ run / save
def test_edit_params_casts_and_checks():
    p = us.edit_params("encode_then_cp", 20.0, 0.5, 0.2, 0.6, 42.0)
    assert p == dict(method="encode_then_cp", steps=20, start_t=0.5, end_t=0.2, noise_scale=0.6, seed=42)
    assert type(p["steps"]) is int and type(p["seed"]) is int
    with pytest.raises(ValueError, match="method"):
        us.edit_params("magic", 20, 0.5, 0.2, 0.6, 42)
    with pytest.raises(ValueError, match="start_t"):
        us.edit_params("cp_then_encode", 20, 1.0, 0.2, 0.6, 42)
    with pytest.raises(ValueError, match="numbers"):
        us.edit_params("cp_then_encode", 20, 0.5, 0.2, 0.6, None)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[2, 1000\]"):  # what edit refuses: not saved
        us.edit_params("encode_then_cp", 1, 0.5, 0.2, 0.6, 42)


def test_ui_defaults_are_the_papers():
    assert us.UI_DEFAULTS == dict(prompt="A photo of an object.", method="encode_then_cp", steps=20, start_t=0.5,
                                  end_t=0.2, noise_scale=0.6, seed=42)


def test_format_timings():
    text = us.format_timings({"inputs": 8, "inversion": 6100, "sampling": 7000, "total": 14200})
    assert text == "Edit took 14.2 s (inversion 6.1 s, sampling 7.0 s)"


def test_save_edit_round_trips_through_the_drag_file(state, tmp_path, monkeypatch):
    st = regions(state, box(100, 150, 100, 160), box(100, 150, 300, 380))
    drag = us.build_drag(st, "region_pairs")
    params = us.edit_params("encode_then_cp", 20, 0.5, 0.2, 0.6, 42)
    folder = us.unique_folder(tmp_path / "out")
    written = us.save_edit(folder, st.image, us.render(st, "region_pairs"), drag.preview(st.image),
                           Image.fromarray(st.image), drag, "A photo of an object.", params)
    assert sorted(written) == ["drag", "input", "original", "preview", "result"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "drag.json", "drag_source0.png", "drag_target0.png", "input.png", "original.png", "preview.png", "result.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "original.png")), st.image)
    loaded, extras = load_drag(folder / "drag.json")
    np.testing.assert_array_equal(loaded.sources[0], drag.sources[0])
    np.testing.assert_array_equal(loaded.targets[0], drag.targets[0])
    assert extras == {"prompt": "A photo of an object.", "params": params}  # no editing mask: all ones

    monkeypatch.setattr(us.time, "strftime", lambda fmt: "edit-now")
    (tmp_path / "out" / "edit-now").mkdir()
    assert us.unique_folder(tmp_path / "out").name == "edit-now-2"  # never overwrites a saved edit
    cmd = us.replay_command(folder, "tiny")
    assert cmd.startswith("python -m regiondrag.engine edit --image ") and cmd.endswith("--model tiny")


@pytest.mark.parametrize("mode,build", [
    ("polygon_pairs", lambda s: vertices(s, (100, 100), (200, 100), (150, 200), (300, 100), (400, 100), (350, 200))),
    ("region_points", lambda s: us.add_point(us.add_point(us.set_region(s, box(100, 200, 100, 200)), (150, 150)),
                                             (250, 150))),
])
def test_save_other_modes(state, tmp_path, mode, build):
    st = build(us.set_shape(state, 3))
    drag = us.build_drag(st, mode)
    us.save_edit(tmp_path, st.image, us.render(st, mode), drag.preview(st.image), None, drag, "p",
                 us.edit_params("cp_then_encode", 40, 0.5, 0.2, 0.6, 1))
    loaded, extras = load_drag(tmp_path / "drag.json")
    assert type(loaded) is type(drag) and extras["params"]["steps"] == 40
    assert not (tmp_path / "result.png").exists()


# ------------------------------------------------------------------------------------ wiring
def test_cli_has_a_ui_command():
    from regiondrag.engine.cli import build_parser

    args = build_parser().parse_args(["ui", "--model", "tiny", "--port", "7999"])
    assert (args.command, args.model, args.port, args.host, args.backend) == ("ui", "tiny", 7999, "127.0.0.1", "torch")


def test_missing_gradio_is_a_one_line_error(monkeypatch):
    import sys

    from regiondrag.engine import ui

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[ui\]'"):
        ui._gradio()


def _stub_page():
    """The page built around a stub pipeline (no model)."""
    pytest.importorskip("gradio", reason="the page needs gradio (pip install -e '.[ui]')")
    import torch

    from regiondrag.engine import ui

    class Stub:
        device, dtype = torch.device("cpu"), torch.float32
        components = type("C", (), {"random_weights": True})()

    return ui.build_app(Stub(), "tiny")


def test_page_builds_with_a_stub_pipeline():
    demo = _stub_page()
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"upload", "editor-m", "vis-p", "editor-r", "vis-r", "preview", "result", "run", "save", "status",
            "banner", "steps", "start-t", "end-t", "noise-scale", "seed", "prompt"} <= ids


def _page_handler(demo, name):
    """The page's handler function called ``name`` (the first event it is wired to)."""
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


def test_page_refuses_a_stale_editor_value(state):
    """A second click on Add region (or one before the new canvas loaded) must not add the handle's
    strokes again as the target; the note keeps saying the canvas is loading until it has loaded."""
    demo = _stub_page()
    add, drawn = _page_handler(demo, "on_add_region"), _page_handler(demo, "on_drawn")
    layer = np.zeros((H, W, 4), np.uint8)
    layer[100:150, 100:160, 3] = 255
    value = {"background": us.render(state, "region_pairs"), "layers": [layer], "composite": None}
    assert "Handle region 1 drawn (3000 pixels)" in drawn(state, value)
    st = add(state, value)[0]
    assert len(st.masks) == 1
    again = add(st, value)  # the same value again: refused, the state left as it was
    assert "still loading" in again[-1] and not isinstance(again[0], us.DragState)
    assert not isinstance(drawn(st, value), str)  # skipped: the note is not overwritten
    fresh = {"background": us.render(st, "region_pairs"), "layers": [], "composite": None}
    assert "Draw target region 1" in drawn(st, fresh)


def test_views_are_written_once_per_content(state):
    """An identical view returned again is the same file, untouched (gradio would rewrite an array in place)."""
    import os

    from regiondrag.engine import ui_views

    view = us.render(state, "polygon_pairs")
    path = ui_views.png_file(view)
    before = os.stat(path)
    assert ui_views.png_file(view.copy()) == path and ui_views.png_file(Image.fromarray(view)) == path
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert np.array_equal(np.asarray(Image.open(path)), view)
    marked = vertices(state, (40, 40))
    assert ui_views.png_file(us.render(marked, "polygon_pairs")) != path
    assert ui_views.png_file(None) is None and ui_views.view_png(us.DragState(), "polygon_pairs") is None
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".part")]
