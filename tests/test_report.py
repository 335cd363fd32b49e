"""The HTML run report: content, self-containment, escaping, the CLI, and a real browser render."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread
from run_fixtures import RunSpec, make_run

import sentinel_core.report as report_module
from sentinel_core.cli import cli
from sentinel_core.cli import report as _report_cli  # noqa: F401  (registers `sentinel report`)
from sentinel_core.errors import SentinelError
from sentinel_core.plots import plot_files
from sentinel_core.report import write_report

pytestmark = pytest.mark.filterwarnings("error")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """Collects tags, images, and each table as rows of cell texts (group rows marked)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.images: list[dict[str, str | None]] = []
        self.tables: list[list[tuple[str, list[str]]]] = []
        self._row: list[str] | None = None
        self._row_class = ""
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, k, v) for k, v in attrs)
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row, self._row_class = [], attributes.get("class") or ""
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append((self._row_class, self._row))
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def summary_rows(page: PageParser) -> tuple[list[str], dict[tuple[str, str], list[str]]]:
    """The summary table's column headers, and its rows keyed by (group, label)."""
    table = page.tables[0]
    header = table[0][1]
    rows: dict[tuple[str, str], list[str]] = {}
    group = ""
    for row_class, cells in table[1:]:
        if row_class == "group":
            group = cells[0]
            continue
        rows[(group, cells[0])] = cells[1:]
    return header, rows


def decoded_images(page: PageParser) -> list[bytes]:
    out = []
    for image in page.images:
        src = image["src"] or ""
        assert src.startswith("data:image/png;base64,"), src[:60]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG_SIGNATURE
        out.append(data)
    return out


def assert_self_contained(page: PageParser) -> None:
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for tag, name, value in page.attrs:
        if name in ("src", "href", "srcset", "action", "poster"):
            assert (value or "").startswith("data:"), f"<{tag} {name}={value[:60]!r}> reaches outside the page"
        if name == "style":
            assert "url(" not in (value or "")


@pytest.fixture(scope="module")
def plotted(tmp_path_factory) -> dict[str, Path]:
    """Finished runs whose plots are already drawn, shared by the tests that only read them."""
    from sentinel_core.plots import plot_run

    root = tmp_path_factory.mktemp("plotted")
    specs = {"grow": RunSpec(growth_percent=0.125),
             "entropy-50": RunSpec(pruning_percent=0.5, pruned_ppl=180.0, final_ppl=44.0),
             "random-50": RunSpec(scorer="random", pruning_percent=0.5, pruned_ppl=310.25, final_ppl=47.125,
                                  sample_after="The <script>alert('x')</script> end")}
    runs = {}
    for name, spec in specs.items():
        make_run(root / name, spec)
        plot_run(root / name)
        runs[name] = root / name
    return runs


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_single_run_report(tmp_path):
    run_dir = tmp_path / "entropy-run"
    made = make_run(run_dir, RunSpec(growth_percent=0.125))
    assert plot_files(run_dir) == []
    out = write_report([run_dir], run_dir / "report.html")
    assert out == run_dir / "report.html"
    # The plots were missing, so the report drew them into the run folder.
    plots = plot_files(run_dir)
    assert [p.name for p in plots] == ["loss.png", "head_importance.png", "head_map.png"]

    page = parse(out)
    assert_self_contained(page)
    header, rows = summary_rows(page)
    assert header == ["", "entropy-run"]
    summary = made["summary"]
    expected = {
        ("Setup", "scorer"): "entropy",
        ("Setup", "pruning"): "25%",
        ("Setup", "fine-tuning"): "plain",
        ("Setup", "fine-tuning steps"): "12 + 6",
        ("Setup", "growth"): "gradient, 12.5%",
        ("Validation perplexity", "baseline"): "40.00",
        ("Validation perplexity", "after pruning"): "95.00",
        ("Validation perplexity", "final"): "42.50",
        ("Heads", "original"): "12",
        ("Heads", "removed"): str(sum(len(v) for v in made["removed"].values())),
        ("Heads", "grown"): str(sum(len(v) for v in made["grown"].values())),
        ("Heads", "final"): str(summary["heads"]["final"]),
        ("Size and speed", "parameters before"): "120,000",
        ("Size and speed", "parameters after"): "100,000",
        ("Size and speed", "tokens/s before"): "5,000",
        ("Size and speed", "tokens/s after"): "6,100",
        ("Size and speed", "speed ratio (after / before)"): "1.22x (1.17–1.26, median of 5 interleaved repeats)",
        ("Size and speed", "KV cache per token before"): "2,048 B",
        ("Size and speed", "KV cache per token after"): "1,536 B",
        ("Size and speed", "time"): f"{sum(made['state']['timings'].values()):.1f} s",
    }
    for key, value in expected.items():
        assert rows[key] == [value], key
    assert rows[("Setup", "model")] == ["tiny-gpt2"]
    # The quality-against-cost figure, then every plot embedded byte for byte; no comparison for a single run.
    images = decoded_images(page)
    assert images[1:] == [p.read_bytes() for p in plots]
    assert [image["alt"] for image in page.images][0].startswith("Quality against cost")
    assert not any(("Task accuracy" in group) for group, _label in rows), "no run scored tasks"
    # Samples are text, never markup: the <b> in the fixture sample arrives as characters.
    text = "".join(page.text)
    assert summary["samples"]["before"][len("The"):] in text and summary["samples"]["after"] in text
    assert "b" not in page.tags
    assert out.stat().st_mode & 0o777 == 0o644


def test_several_runs_side_by_side(tmp_path, plotted):
    dirs = [copy_run(plotted["grow"], tmp_path / "a" / "run"), copy_run(plotted["entropy-50"], tmp_path / "b" / "run"),
            plotted["random-50"]]
    out = write_report(dirs, tmp_path / "all.html")
    page = parse(out)
    assert_self_contained(page)
    header, rows = summary_rows(page)
    # Two folders share the name "run", so their columns carry a longer path tail.
    assert header == ["", "a/run", "b/run", "random-50"]
    assert rows[("Setup", "scorer")] == ["entropy", "entropy", "random"]
    assert rows[("Setup", "pruning")] == ["25%", "50%", "50%"]
    assert rows[("Validation perplexity", "after pruning")] == ["95.00", "180.00", "310.25"]
    assert rows[("Validation perplexity", "final")] == ["42.50", "44.00", "47.12"]
    assert rows[("Setup", "growth")] == ["gradient, 12.5%", "none", "none"]
    images = decoded_images(page)
    run_plots = [p for d in dirs for p in plot_files(d)]
    assert len(run_plots) == 9 and all(p.is_file() for p in run_plots)
    assert len(images) == len(run_plots) + 2  # plus quality against cost, and the strategy comparison
    assert sum(1 for image in page.images if "pruning percent" in (image["alt"] or "")) == 1
    assert sum(1 for image in page.images if "Quality against cost" in (image["alt"] or "")) == 1
    # The two cross-run figures come first; then every run's plots, each exactly once.
    assert not {images[0], images[1]} & {p.read_bytes() for p in run_plots}
    assert sorted(images[2:]) == sorted(p.read_bytes() for p in run_plots)
    samples = page.tables[-1]
    assert samples[0][1] == ["", "a/run", "b/run", "random-50"]
    assert "script" not in page.tags and "The <script>alert('x')</script> end" in "".join(page.text)


def test_existing_plots_are_used_as_they_are(tmp_path, monkeypatch, plotted):
    def refuse(_run_dir):
        raise AssertionError("plot_run called although the plots exist")

    monkeypatch.setattr(report_module, "plot_run", refuse)
    page = parse(write_report([plotted["entropy-50"]], tmp_path / "r.html"))
    assert decoded_images(page)[1:] == [p.read_bytes() for p in plot_files(plotted["entropy-50"])]


def test_a_read_only_run_folder_is_plotted_elsewhere(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    make_run(run_dir, RunSpec())
    real = report_module.plot_run

    def read_only(target):
        if Path(target) == run_dir:
            raise PermissionError(13, "Permission denied", str(run_dir / "loss.png"))
        return real(target)

    monkeypatch.setattr(report_module, "plot_run", read_only)
    page = parse(write_report([run_dir], tmp_path / "r.html"))
    assert len(decoded_images(page)) == 4  # three plots and quality against cost
    assert plot_files(run_dir) == []


def test_speed_says_how_it_was_measured_and_tasks_get_rows(tmp_path):
    measured = make_run(tmp_path / "measured", RunSpec(task_accuracy={"piqa": (0.625, 0.6), "arc_easy": (0.5, 0.25)}))
    single = make_run(tmp_path / "single", RunSpec(speed_interleaved=False, tokens_per_second_after=8950.0))
    _, rows = summary_rows(parse(write_report([tmp_path / "measured", tmp_path / "single"], tmp_path / "r.html")))
    low, high = measured["summary"]["speed"]["ratio_range"]
    assert rows[("Size and speed", "speed ratio (after / before)")] == [
        f"1.22x ({low:.2f}–{high:.2f}, median of 5 interleaved repeats)",
        "1.79x (indicative: one evaluation pass each)"]
    assert single["summary"]["speed"]["ratio"] == pytest.approx(1.79)
    group = "Task accuracy (lm-eval, before → after)"
    assert rows[(group, "arc_easy acc")] == ["0.500 → 0.250", "–"]
    assert rows[(group, "piqa acc")] == ["0.625 → 0.600", "–"]


def test_a_summary_from_before_the_speed_measurement_is_labelled_indicative(tmp_path):
    import json

    make_run(tmp_path / "old", RunSpec())
    path = tmp_path / "old" / "summary.json"
    summary = json.loads(path.read_text())
    summary["speed"] = {"tokens_per_second_before": 5000.0, "tokens_per_second_after": 6100.0, "ratio": 1.22}
    del summary["kv_cache"]
    path.write_text(json.dumps(summary))
    _, rows = summary_rows(parse(write_report([tmp_path / "old"], tmp_path / "r.html")))
    assert rows[("Size and speed", "speed ratio (after / before)")] == ["1.22x (indicative: one evaluation pass each)"]
    assert rows[("Size and speed", "KV cache per token after")] == ["–"]


def test_unfinished_or_missing_runs_are_refused(tmp_path):
    make_run(tmp_path / "half", RunSpec(stop_after="fine_tune"))
    for bad, message in ((tmp_path / "half", "not a finished Sentinel run"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(SentinelError) as error:
            write_report([bad], tmp_path / "r.html")
        assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SentinelError, match="no run folders"):
        write_report([], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_cli_report(tmp_path, monkeypatch, plotted):
    one = copy_run(plotted["entropy-50"], tmp_path / "one")
    two = copy_run(plotted["random-50"], tmp_path / "two")
    runner = CliRunner()

    result = runner.invoke(cli, ["report", str(one)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(one / "report.html") and (one / "report.html").is_file()

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["report", str(one), str(two)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "sentinel_report.html" and (tmp_path / "sentinel_report.html").is_file()

    result = runner.invoke(cli, ["report", str(one), "--output", str(tmp_path / "x" / "mine.html")])
    assert result.exit_code == 0 and (tmp_path / "x" / "mine.html").is_file()

    make_run(tmp_path / "half", RunSpec(stop_after="prune"))
    result = runner.invoke(cli, ["report", str(tmp_path / "half")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "not a finished Sentinel run" in lines[0]

    result = runner.invoke(cli, ["report"])
    assert result.exit_code == 2  # RUN_DIRS is required


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path, plotted):
    page = write_report([plotted["grow"]], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3600",
               page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    rgb = imread(shot)[..., :3]
    assert rgb.shape[:2] == (3600, 1200)
    assert float(rgb.var()) > 1e-3
    # The loss plot's shaded fine_tune band and the head map's "alive" blue fill solid areas
    # only if the embedded PNGs were decoded and drawn.
    for colour in ("#e8f0fb", "#4c72b0"):
        target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255.0
        assert int((np.abs(rgb - target).max(axis=-1) < 3 / 255).sum()) > 2000, colour
