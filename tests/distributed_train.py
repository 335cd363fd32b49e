"""Train the toy model with ``sentinel_core.training.train`` and write what rank 0 saw.

tests/test_distributed.py calls :func:`run_training` in its own process (one process) and runs
this file as two CPU processes (``python -m torch.distributed.run --standalone --nproc_per_node 2
distributed_train.py``); ``--global-batch`` is split over however many processes there are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_fixtures import make_data, make_model  # noqa: E402

from sentinel_core.config import ExperimentConfig  # noqa: E402
from sentinel_core.hookspecs import hookimpl  # noqa: E402
from sentinel_core.plugins import pm  # noqa: E402
from sentinel_core.training import train  # noqa: E402


class Collect:
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.evals: dict[int, float] = {}

    @hookimpl
    def on_metric(self, event):
        if "loss" in event.values:
            self.losses[event.step] = event.values["loss"]
        if "eval_loss" in event.values:
            self.evals[event.step] = event.values["eval_loss"]


def run_training(output_dir: str, global_batch: int = 4, steps: int = 6) -> dict:
    """Train the toy model; returns what this process saw (its losses, eval losses, final weights)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = ExperimentConfig(device="cpu", batch_size=global_batch // world, learning_rate=3e-3,
                              max_steps=steps, eval_every=3, patience=0, warmup_fraction=0.2,
                              checkpoint_every=4, output_dir=output_dir, quiet=True, seed=11,
                              max_eval_blocks=6)
    collect = Collect()
    pm.register(collect)
    try:
        model = make_model(seed=0)
        result = train(model, make_data(48), config, stage="fine_tune")
    finally:
        pm.unregister(collect)
    state = {k: v.detach().flatten().tolist() for k, v in model.state_dict().items()}
    return {"world": world, "losses": collect.losses, "evals": collect.evals, "steps": result.steps,
            "state": state}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    record = run_training(args.output_dir, args.global_batch, args.steps)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
