"""``python -m sentinel_core.demo``: build the demo model if needed and print its perplexities."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SentinelError
from ..fileio import write_json_atomic
from .model import SPECS, ensure_demo_model
from .report import measure_demo_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sentinel_core.demo", description=__doc__)
    parser.add_argument("--spec", choices=sorted(SPECS), default=None,
                        help="which demo model (default: $SENTINEL_DEMO_SPEC or full)")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: $SENTINEL_CACHE_DIR or the user cache)")
    parser.add_argument("--out", default=None, help="also write the measurements as JSON to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        path = ensure_demo_model(quiet=args.quiet, spec=args.spec, cache_dir=args.cache_dir)
        report = measure_demo_model(path, cache_dir=args.cache_dir, progress=not args.quiet)
    except SentinelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    build = report["build"]
    print(f"demo model:               {path}")
    print(f"spec:                     {report['spec']} ({report['parameters']['total']:,} parameters)")
    print(f"build time:               {build['seconds']['total']:.0f} s (training {build['seconds']['train']:.0f} s, "
          f"{build['train_tokens_per_second']:.0f} tok/s on {build['device']}, {build['threads']} threads)")
    print(f"test perplexity:          {report['test_perplexity']:.1f} ({report['test_tokens_scored']:,} tokens)")
    print(f"unigram test perplexity:  {report['unigram_test_perplexity']:.1f} (add-one, train-split counts)")
    if args.out:
        write_json_atomic(Path(args.out), report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
