"""Plots of a run folder: valid PNGs, the right data on them, and clean skips."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from run_fixtures import RunSpec, make_run, train_loss

from sentinel_core.errors import SentinelError
from sentinel_core.plots import (
    _ALIVE,
    _EMPTY,
    _GROWN,
    _KIND_COLOURS,
    _MASKED,
    _REMOVED,
    _head_map_panels,
    _RunRecord,
    _training_curves,
    plot_comparison,
    plot_files,
    plot_quality_cost,
    plot_run,
)
from sentinel_core.tracking import read_metrics

pytestmark = pytest.mark.filterwarnings("error")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> np.ndarray:
    """A real, non-blank PNG; returns its RGB pixels in [0, 1]."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR, read independently of the decoder
    image = imread(path)
    assert image.shape[:2] == (height, width)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert width >= 300 and height >= 200
    rgb = image[..., :3]
    assert float(rgb.var()) > 1e-3, f"{path.name} is blank"
    return rgb


def colour_pixels(rgb: np.ndarray, hex_colour: str, radius: int = 3) -> int:
    """Pixels of ``hex_colour`` inside a solid (2r+1)-square patch of it: filled areas count,
    anti-aliased edges of text and lines (which pass through many greys) do not."""
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255.0
    match = np.abs(rgb - target).max(axis=-1) < 1.5 / 255
    h, w = match.shape
    solid = match[radius:h - radius, radius:w - radius].copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            solid &= match[radius + dy:h - radius + dy, radius + dx:w - radius + dx]
    return int(solid.sum())


def test_full_run_writes_every_plot(tmp_path):
    spec = RunSpec(growth_percent=0.125, nan_score_heads=[(1, 2)],
                   extra_score_events={"magnitude": [[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0]]})
    make_run(tmp_path, spec)
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["loss.png", "head_importance.png", "head_importance_magnitude.png",
                                         "head_map.png"]
    assert plot_files(tmp_path) == written
    images = {p.name: assert_png(p) for p in written}
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes left a temporary file"
    # The NaN score (a head with no score) is drawn in the "bad" grey, and only where NaN exists.
    assert colour_pixels(images["head_importance.png"], "#c8c8c8") > 100
    assert colour_pixels(images["head_importance_magnitude.png"], "#c8c8c8") == 0
    # Head map: removed heads and grown heads both appear in their colours; nothing masked.
    head_map = images["head_map.png"]
    assert colour_pixels(head_map, _KIND_COLOURS[_REMOVED]) > 100
    assert colour_pixels(head_map, _KIND_COLOURS[_GROWN]) > 100
    assert colour_pixels(head_map, _KIND_COLOURS[_MASKED]) == 0


def test_masked_run_draws_masked_heads_and_no_growth_panel(tmp_path):
    made = make_run(tmp_path, RunSpec(prune_mode="mask", pruning_percent=0.5))
    plot_run(tmp_path)
    rgb = assert_png(tmp_path / "head_map.png")
    assert colour_pixels(rgb, _KIND_COLOURS[_MASKED]) > 100
    assert colour_pixels(rgb, _KIND_COLOURS[_REMOVED]) == 0
    assert colour_pixels(rgb, _KIND_COLOURS[_GROWN]) == 0
    panels = _head_map_panels(_RunRecord.read(tmp_path))
    assert [title for title, _ in panels] == ["original", "after pruning"]
    after = panels[1][1]
    masked = {(int(layer), int(h)) for layer, h in zip(*np.nonzero(after == _MASKED), strict=True)}
    assert masked == {(layer, h) for layer, heads in made["removed"].items() for h in heads}


def test_head_map_grids_match_the_recorded_heads(tmp_path):
    made = make_run(tmp_path, RunSpec(growth_percent=0.125))
    panels = _head_map_panels(_RunRecord.read(tmp_path))
    assert [title for title, _ in panels] == ["original", "after pruning", "after growth"]
    before, pruned, grown = (grid for _, grid in panels)
    assert (before[:, :4] == _ALIVE).all() and (before[:, 4:] == _EMPTY).all()
    removed = {(layer, h) for layer, heads in made["removed"].items() for h in heads}
    assert {(int(layer), int(h)) for layer, h in zip(*np.nonzero(pruned == _REMOVED), strict=True)} == removed
    new = {(layer, h) for layer, heads in made["grown"].items() for h in heads}
    assert new and all(h >= 4 for _, h in new)
    assert {(int(layer), int(h)) for layer, h in zip(*np.nonzero(grown == _GROWN), strict=True)} == new
    # The heads that work at the end agree with what the run counted per layer.
    working = [int(np.isin(row, (_ALIVE, _GROWN)).sum()) for row in grown]
    assert working == made["state"]["results"]["heads_final"]["per_layer"]


def test_training_steps_continue_across_stages(tmp_path):
    make_run(tmp_path, RunSpec(fine_tune_steps=12, growth_percent=0.125, growth_steps=6, eval_every=3))
    curves, spans = _training_curves(_RunRecord.read(tmp_path))
    assert spans == {"fine_tune": (0, 12), "fine_tune_growth": (12, 18)}
    assert sorted(curves["fine_tune"]["loss"]) == list(range(1, 13))
    assert sorted(curves["fine_tune_growth"]["loss"]) == list(range(13, 19))
    # The fixture's loss at growth step k is train_loss(12 + k): same global step.
    for step, value in curves["fine_tune_growth"]["loss"].items():
        assert value == pytest.approx(train_loss(step))
    assert sorted(curves["fine_tune"]["perplexity"]) == [3, 6, 9, 12]
    assert sorted(curves["fine_tune_growth"]["perplexity"]) == [15, 18]
    assert set(curves["fine_tune"]) == {"loss", "perplexity", "lr:lr"}


def test_a_resumed_stage_keeps_the_later_values(tmp_path):
    make_run(tmp_path, RunSpec(fine_tune_steps=8))
    # A resumed run re-emits the steps after its last checkpoint; those are the ones that count.
    with (tmp_path / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        for step in (7, 8):
            handle.write(json.dumps({"stage": "fine_tune", "step": step, "time": 0.0, "loss": 10.0 + step}) + "\n")
    curves, spans = _training_curves(_RunRecord.read(tmp_path))
    assert spans["fine_tune"] == (0, 8)
    assert curves["fine_tune"]["loss"][7] == 17.0 and curves["fine_tune"]["loss"][8] == 18.0
    assert curves["fine_tune"]["loss"][6] == pytest.approx(train_loss(6))


def test_interrupted_metrics_parse_line_by_line_and_still_plot(tmp_path):
    make_run(tmp_path, RunSpec(stop_after="fine_tune"))
    path = tmp_path / "metrics.jsonl"
    complete = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    # A hard kill in the middle of a write leaves half a line at the end.
    half = json.dumps({"stage": "fine_tune", "step": 99, "time": 1.0, "loss": 1.5})
    with path.open("a", encoding="utf-8") as handle:
        handle.write(half[: len(half) // 2])
    records = read_metrics(tmp_path)
    assert len(records) == len(complete) and len(records) > 10
    # NaN survives the round trip: json writes it as NaN, and tensors keep it.
    for got, want in zip(records, complete, strict=True):
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["loss.png", "head_importance.png", "head_map.png"]
    for png in written:
        assert_png(png)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(("stop_after", "expected"), [
    ("baseline", []),
    ("score", ["head_importance.png"]),
    ("prune", ["head_importance.png", "head_map.png"]),
])
def test_plots_without_data_are_skipped(tmp_path, stop_after, expected):
    make_run(tmp_path, RunSpec(stop_after=stop_after))
    written = plot_run(tmp_path)
    assert [p.name for p in written] == expected
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(expected)


def test_an_empty_folder_gives_no_plots_and_a_missing_one_an_error(tmp_path):
    assert plot_run(tmp_path) == []
    with pytest.raises(SentinelError, match="does not exist"):
        plot_run(tmp_path / "nope")


def test_malformed_head_data_skips_that_plot_with_a_warning(tmp_path):
    make_run(tmp_path, RunSpec())
    state_path = tmp_path / "state.json"
    state = json.loads(state_path.read_text())
    state["results"]["removed"] = {"0": [99]}
    state_path.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="head map"):
        written = plot_run(tmp_path)
    assert [p.name for p in written] == ["loss.png", "head_importance.png"]


def test_plotting_leaves_pyplot_alone(tmp_path):
    make_run(tmp_path, RunSpec())
    code = ("import sys; from sentinel_core.plots import plot_run; "
            f"files = plot_run({str(tmp_path)!r}); assert len(files) == 3, files; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'")
    # A user's interactive backend choice must not matter: plotting never resolves it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                     os.environ.get("PYTHONPATH", "")]), "MPLBACKEND": "TkAgg"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_comparison_plot(tmp_path):
    dirs = []
    for scorer, factor in (("entropy", 1.0), ("random", 1.5)):
        for percent in (0.25, 0.5):
            d = tmp_path / f"{scorer}-{int(percent * 100)}"
            make_run(d, RunSpec(scorer=scorer, pruning_percent=percent, pruned_ppl=40 * (1 + 4 * factor * percent),
                                final_ppl=40 * (1 + 0.1 * factor * percent)))
            dirs.append(d)
    out = plot_comparison(dirs, tmp_path / "out" / "comparison.png")
    assert out == tmp_path / "out" / "comparison.png"
    rgb = assert_png(out)
    assert rgb.shape[1] > rgb.shape[0]  # two panels side by side
    # Matplotlib's default first two line colours: one line per scorer.
    assert colour_pixels(rgb, "#1f77b4", radius=1) > 50 and colour_pixels(rgb, "#ff7f0e", radius=1) > 50
    assert colour_pixels(rgb, "#2ca02c", radius=1) == 0  # no third series


def test_the_percent_axis_fits_the_runs_percents():
    from sentinel_core.plots import _figure, _fit_percent_axis

    ax = _figure(4, 3).subplots()
    ax.plot([30, 30, 30], [1, 2, 3])
    _fit_percent_axis(ax, [30.0, 30.0, 30.0])
    assert ax.get_xlim() == (27.5, 32.5) and list(ax.get_xticks()) == [30.0]
    assert ax.xaxis.get_major_formatter()(30.0, 0) == "30%"
    _fit_percent_axis(ax, [10.0, 30.0, 50.0])
    assert ax.get_xlim() == pytest.approx((6.8, 53.2)) and list(ax.get_xticks()) == [10.0, 30.0, 50.0]


def test_quality_cost_plot(tmp_path):
    dirs = []
    for name, spec in (("entropy-25", RunSpec()),
                       ("entropy-50", RunSpec(pruning_percent=0.5, final_ppl=55.0, parameters_after=90_000,
                                              kv_bytes_after=1024, tokens_per_second_after=7000.0)),
                       ("random-25", RunSpec(scorer="random", final_ppl=47.0, speed_interleaved=False))):
        make_run(tmp_path / name, spec)
        dirs.append(tmp_path / name)
    rgb = assert_png(plot_quality_cost(dirs, tmp_path / "cost.png"))
    assert rgb.shape[1] > 2 * rgb.shape[0]  # three cost panels side by side, one quality row
    assert colour_pixels(rgb, "#1f77b4", radius=2) > 20 and colour_pixels(rgb, "#ff7f0e", radius=1) > 5
    assert colour_pixels(rgb, "#000000", radius=1) > 40  # the unpruned stars (text is too thin to count)
    with_tasks = []
    for name, acc in (("a", (0.6, 0.55)), ("b", (0.6, 0.5))):
        make_run(tmp_path / name, RunSpec(task_accuracy={"piqa": acc}))
        with_tasks.append(tmp_path / name)
    taller = assert_png(plot_quality_cost(with_tasks, tmp_path / "cost-tasks.png"))
    assert taller.shape[0] > 1.6 * rgb.shape[0]  # a second row: task accuracy


def test_quality_cost_points_come_from_the_summaries(tmp_path):
    from sentinel_core.plots import _baselines, _cost_point, load_summary

    make_run(tmp_path / "a", RunSpec(task_accuracy={"piqa": (0.6, 0.5), "arc": (0.4, 0.3)}))
    make_run(tmp_path / "b", RunSpec(speed_interleaved=False, tokens_per_second_after=5500.0))
    a, b = (_cost_point(load_summary(tmp_path / n), tmp_path / n) for n in "ab")
    assert a["after"] == {"parameters": 100_000, "kv_bytes": 1536, "tokens_per_second": 6100.0, "perplexity": 42.5,
                          "accuracy": pytest.approx(0.4)}
    assert a["before"]["accuracy"] == pytest.approx(0.5) and a["before"]["kv_bytes"] == 2048
    assert a["after_range"]["tokens_per_second"] == pytest.approx([0.97 * 6100, 1.02 * 6100])
    assert not a["indicative_speed"] and b["indicative_speed"] and b["after"]["accuracy"] is None
    # Both runs prune the same model: one baseline point.
    assert _baselines([a, b]) == [{"parameters": 120_000, "kv_bytes": 2048, "tokens_per_second": 5000.0,
                                   "perplexity": 40.0, "accuracy": 0.5}]


def test_comparison_refuses_unfinished_runs(tmp_path):
    make_run(tmp_path / "done", RunSpec())
    make_run(tmp_path / "half", RunSpec(stop_after="prune"))
    with pytest.raises(SentinelError) as error:
        plot_comparison([tmp_path / "done", tmp_path / "half"], tmp_path / "c.png")
    assert "not a finished Sentinel run" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SentinelError, match="no run folders"):
        plot_comparison([], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_series_split_by_fine_tuner_and_growth():
    from sentinel_core.plots import _median, _series_keys

    points = [{"scorer": "entropy", "fine_tune": "plain", "growth": ""},
              {"scorer": "entropy", "fine_tune": "adaptive", "growth": "gradient 10%"}]
    assert _series_keys(points) == ["entropy, fine-tune plain", "entropy, fine-tune adaptive, grow gradient 10%"]
    assert _series_keys(points[:1]) == ["entropy"]
    assert _median([3.0, 1.0, 2.0]) == 2.0 and _median([4.0, 1.0]) == 2.5
    assert math.isclose(_median([1.0]), 1.0)


def test_training_event_keys():
    from sentinel_core.plots import _curve_values

    assert _curve_values({"loss": 2.5, "lr": 1e-3}) == {"loss": 2.5, "lr:lr": 1e-3}
    # "perplexity" next to a training loss and no eval_loss would be ambiguous: not validation.
    assert _curve_values({"loss": 2.5, "perplexity": 12.2}) == {"loss": 2.5}
    assert _curve_values({"eval_loss": 2.0, "perplexity": 7.4}) == {"perplexity": 7.4}
    assert _curve_values({"eval_loss": 2.0}) == {"perplexity": pytest.approx(math.exp(2.0))}
    assert _curve_values({"eval_loss": None, "eval_perplexity": None}) == {}
    # What sentinel_core.training emits per step: training perplexity beside loss, rates per group.
    assert _curve_values({"loss": 2.0, "perplexity": 7.39, "grad_norm": 0.5, "lr/base": 1e-4, "lr/grown": 5e-4}) == {
        "loss": 2.0, "lr:lr/base": 1e-4, "lr:lr/grown": 5e-4}
    assert _curve_values({"eval_loss": 2.0, "eval_perplexity": 7.39, "best_eval_loss": 1.9}) == {"perplexity": 7.39}
    assert _curve_values({"rollback": True, "lr_scale": 0.5}) == {"rollback": 1.0}
    assert _curve_values({"learning_rates": {"base": 1e-4, "grown": 5e-4}}) == {
        "lr:learning_rates/base": 1e-4, "lr:learning_rates/grown": 5e-4}


def reddish(rgb: np.ndarray) -> int:
    return int(((rgb[..., 0] > 0.75) & (rgb[..., 1] < 0.45) & (rgb[..., 2] < 0.45)).sum())


def test_rollbacks_are_marked_and_their_steps_replaced(tmp_path):
    make_run(tmp_path, RunSpec(fine_tune_steps=10))
    red_before = reddish(assert_png(plot_run(tmp_path)[0]))
    with (tmp_path / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        # What sentinel_core.training emits when it rolls back to its step-6 checkpoint.
        handle.write(json.dumps({"stage": "fine_tune", "step": 6, "time": 0.0, "rollback": True, "lr_scale": 0.5,
                                 "rolled_back_from": 9, "reason": "3 non-finite steps in a row"}) + "\n")
        handle.write(json.dumps({"stage": "fine_tune", "step": 7, "time": 0.0, "loss": 9.0, "lr": 1e-4}) + "\n")
    curves, _spans = _training_curves(_RunRecord.read(tmp_path))
    assert curves["fine_tune"]["rollback"] == {6: 1.0}
    assert curves["fine_tune"]["loss"][7] == 9.0
    assert "lr_scale" not in "".join(curves["fine_tune"])
    # The rollback line crosses every panel: many more red pixels than the pruned-eval line alone.
    assert reddish(assert_png(plot_run(tmp_path)[0])) > red_before + 300
