"""Plot the quality benchmarks: perplexity against the fraction of heads removed, per scorer.

Reads the JSON that ``bench_scoring_quality.py`` wrote (without and with ``--fine-tune-steps``)
and writes one PNG with a panel for each.

    python bench/plot_quality.py bench/results/scoring-quality.json bench/results/quality-fine-tuned.json \\
        --out docs/img/quality.png
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sentinel_core.fileio import write_bytes_atomic


def _seeds(seeds: list[int]) -> str:
    return f"median of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="JSON of a run without fine-tuning")
    parser.add_argument("after", help="JSON of a run with --fine-tune-steps")
    parser.add_argument("--out", default="docs/img/quality.png")
    args = parser.parse_args()
    before, after = (json.loads(Path(p).read_text()) for p in (args.before, args.after))

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    panels = [
        (before["median_perplexity"], before["baseline_perplexity"], "unpruned",
         f"after pruning, {_seeds(before['seeds'])}"),
        (after["median_fine_tuned_perplexity"], min(after["reference_fine_tuned_perplexity"]),
         "unpruned, fine-tuned the same",
         f"after {after['fine_tune_steps']} fine-tuning steps, {_seeds(after['seeds'])}"),
    ]
    for index, (medians, reference, reference_label, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, index)
        for scorer, by_percent in sorted(medians.items()):
            percents = sorted(by_percent, key=float)
            axes.plot([100 * float(p) for p in percents], [by_percent[p] for p in percents], marker="o",
                      label=scorer, linestyle="--" if scorer == "random" else "-")
        axes.axhline(reference, color="grey", linewidth=1, linestyle=":", label=reference_label)
        # Keep the reference line inside the panel with a margin, not on its edge.
        values = [reference, *(v for by_percent in medians.values() for v in by_percent.values())]
        pad = 0.06 * (max(values) - min(values))
        axes.set_ylim(min(values) - pad, max(values) + pad)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("heads removed (%)")
        axes.set_ylabel("validation perplexity")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("Demo model: perplexity against pruning, per scorer", fontsize=11)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="white")
    write_bytes_atomic(args.out, buffer.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
