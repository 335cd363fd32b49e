"""The whole ``sentinel run`` under two CPU processes (torchrun, gloo) against one process.

Both see the same global batch (two processes of batch 2, one of batch 4), so they must select
the same heads, grow the same ones back and reach the same perplexity; the main process alone
writes the run folder and reports, so every training step is in ``metrics.jsonl`` once and the
folder holds the files of a one-process run, no more. ``accelerate launch --cpu`` needs MPI for
several CPU processes (without it, it starts one), so the processes are started with torch's own
launcher, as tests/test_distributed.py does.

The tiny model has no dropout: with dropout each process draws its own masks (as in any
data-parallel training), and the two trajectories would agree only statistically.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from sentinel_core.config import ExperimentConfig
from sentinel_core.tracking import read_metrics

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo back-end")

ROOT = Path(__file__).resolve().parents[1]
STOP_SCRIPT = Path(__file__).with_name("multiprocess_stop.py")
STEPS = 4
GLOBAL_BATCH = 4
# Pruning and growth both change the model: every process must come out of each with the same one.
SETTINGS = {"scorer": "gradient", "pruning_percent": 0.25, "growth_strategy": "gradient", "growth_percent": 0.125,
            "block_size": 32, "max_steps": STEPS, "eval_every": 2, "checkpoint_every": 2, "max_eval_blocks": 8,
            "device": "cpu", "seed": 3, "speed_repeats": 1, "log_every": 1}
TRAINING_STAGES = ("fine_tune", "fine_tune_growth")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from data_fixtures import make_tokenizer, sample_lines, tiny_gpt2

    tmp = tmp_path_factory.mktemp("multiprocess")
    tokenizer = make_tokenizer(400)
    model = tiny_gpt2(len(tokenizer), n_layer=2, n_head=4, n_embd=32, n_positions=64, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    (tmp / "corpus.txt").write_text("\n".join(sample_lines(600, seed=7)) + "\n", encoding="utf-8")
    env = {"SENTINEL_CACHE_DIR": str(tmp / "cache"), "HF_DATASETS_CACHE": str(tmp / "hf-datasets")}
    return {"tmp": tmp, "model": str(tmp / "model"), "data": str(tmp / "corpus.txt"), "env": env}


def _flags(assets, output_dir: Path, batch_size: int) -> list[str]:
    flags = ["--model", assets["model"], "--data", assets["data"], "--batch-size", str(batch_size),
             "--output-dir", str(output_dir)]
    for name, value in SETTINGS.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def launch_two(assets, name: str, args: list[str], *, script: Path | None = None,
               env: dict[str, str] | None = None) -> tuple[int, dict[int, str]]:
    """Run ``args`` (a ``sentinel`` command line) in two processes; returns the exit code and
    each rank's stderr (torchrun's ``--redirects`` keeps them apart)."""
    logs = assets["tmp"] / f"logs-{name}"
    target = [str(script)] if script else ["-m", "sentinel_core"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3", *target, *args]
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    **assets["env"], **(env or {}))
    done = subprocess.run(command, env=full_env, cwd=assets["tmp"], capture_output=True, text=True, timeout=240)
    errors = {int(path.parent.name): path.read_text(encoding="utf-8") for path in logs.rglob("stderr.log")}
    assert sorted(errors) == [0, 1], done.stderr[-3000:]
    return done.returncode, errors


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _train_losses(folder: Path) -> dict[tuple[str, int], list[float]]:
    steps: dict[tuple[str, int], list[float]] = {}
    for event in read_metrics(folder):
        if event["stage"] in TRAINING_STAGES and "loss" in event:
            steps.setdefault((event["stage"], event["step"]), []).append(event["loss"])
    return steps


@pytest.fixture(scope="module")
def one_process(assets):
    from sentinel_core.pipeline import run_experiment

    out = assets["tmp"] / "one"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in assets["env"].items():
            patch.setenv(key, value)
        config = ExperimentConfig(model_name=assets["model"], data=assets["data"], batch_size=GLOBAL_BATCH,
                                  output_dir=str(out), quiet=True, **SETTINGS)
        _, _, summary = run_experiment(config)
    return {"dir": out, "summary": summary}


def _check_against_one_process(two_dir: Path, one_process) -> dict:
    one = one_process["summary"]
    two = json.loads((two_dir / "summary.json").read_text())
    assert two["heads"]["removed_heads"] == one["heads"]["removed_heads"] != {}
    assert two["heads"]["grown_heads"] == one["heads"]["grown_heads"] != {}
    # Evaluation is split over the processes and summed back: the same number up to summation order.
    assert two["perplexity"]["baseline"] == pytest.approx(one["perplexity"]["baseline"], rel=1e-9)
    assert two["perplexity"]["pruned"] == pytest.approx(one["perplexity"]["pruned"], rel=1e-9)
    assert two["perplexity"]["final"] == pytest.approx(one["perplexity"]["final"], rel=1e-3)
    assert two["samples"]["before"] == one["samples"]["before"]
    assert two["fine_tune"]["steps"] == one["fine_tune"]["steps"] == STEPS
    assert two["fine_tune_growth"]["steps"] == one["fine_tune_growth"]["steps"] == STEPS
    losses_two, losses_one = _train_losses(two_dir), _train_losses(one_process["dir"])
    every_step = sorted((stage, step) for stage in TRAINING_STAGES for step in range(1, STEPS + 1))
    assert sorted(losses_two) == sorted(losses_one) == every_step
    assert all(len(values) == 1 for values in losses_two.values()), losses_two  # each step logged once
    for key, values in losses_one.items():
        assert losses_two[key][0] == pytest.approx(values[0], rel=1e-5), key
    # Only the main process wrote: the same files as one process's run, and no lock left held.
    assert _files(two_dir) == _files(one_process["dir"])
    assert not (two_dir / ".sentinel.lock.json").exists()
    return two


def test_two_processes_match_one_with_the_same_global_batch(assets, one_process):
    out = assets["tmp"] / "two"
    code, errors = launch_two(assets, "two", ["run", *_flags(assets, out, GLOBAL_BATCH // 2)])
    assert code == 0, errors[0][-3000:] + errors[1][-3000:]
    two = _check_against_one_process(out, one_process)
    assert two["effective_config"]["batch_size"] == GLOBAL_BATCH // 2
    # The main process tells the story, once: every step's progress line is in rank 0's log.
    for step in range(1, STEPS + 1):
        assert len(re.findall(rf"^fine_tune step {step}/{STEPS} \(", errors[0], flags=re.M)) == 1, errors[0]
    assert "fine_tune step" not in errors[1] and "Evaluating" not in errors[1], errors[1]


def test_two_processes_resume_an_interrupted_run(assets, one_process):
    out = assets["tmp"] / "cut"
    code, errors = launch_two(assets, "cut", ["run", *_flags(assets, out, GLOBAL_BATCH // 2)], script=STOP_SCRIPT,
                              env={"STOP_AFTER_STEP": "3"})
    assert code != 0 and not (out / "summary.json").exists()
    assert f"resume with `sentinel run --resume {out}`" in errors[0], errors[0][-3000:]
    assert "resume with" not in errors[1]
    code, errors = launch_two(assets, "resumed", ["run", "--resume", str(out)])
    assert code == 0, errors[0][-3000:] + errors[1][-3000:]
    # Under several processes the deferred step agrees on a stop one step later (docs/fine-tuning.md,
    # "Non-finite losses"): a stop asked at step 3 is saved at step 3 or 4.
    assert re.search(r"Resuming fine_tune from step [34] of 4", errors[0]), errors[0][-3000:]
    _check_against_one_process(out, one_process)
    # Bad input: the main process's one line, on every process, and no traceback.
    code, errors = launch_two(assets, "again", ["run", "--resume", str(out)])
    assert code != 0
    for text in errors.values():
        assert text.strip().splitlines()[-1] == f"Error: the run in {str(out)!r} already finished; see summary.json"
        assert "Traceback" not in text
