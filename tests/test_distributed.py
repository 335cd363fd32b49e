"""Data-parallel training: two CPU processes (gloo) give the trajectory of one process.

``accelerate launch --cpu --num_processes 2`` needs mpirun for several CPU processes, so the
test starts them with torch's own launcher (``torchrun``); Accelerate picks the gloo back-end
from the environment torchrun sets, with no change to the training code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_train import run_training

SCRIPT = Path(__file__).with_name("distributed_train.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command[:6])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    two = tmp_path / "two.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
          "--out", str(two), "--output-dir", str(tmp_path / "run2")], tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1 does for each of its processes
    try:
        a = json.loads(json.dumps(run_training(str(tmp_path / "run1"))))  # keys as JSON gives them
    finally:
        torch.set_num_threads(threads)
    b = json.loads(two.read_text())
    assert (a["world"], b["world"]) == (1, 2)
    assert a["steps"] == b["steps"] == 6
    assert sorted(a["losses"], key=int) == [str(s) for s in range(1, 7)]
    assert a["losses"].keys() == b["losses"].keys() and a["evals"].keys() == b["evals"].keys()
    for key in a["losses"]:
        assert abs(a["losses"][key] - b["losses"][key]) < 1e-5, key
    for key in a["evals"]:
        assert abs(a["evals"][key] - b["evals"][key]) < 1e-5, key
    worst = max(abs(x - y) for name in a["state"] for x, y in zip(a["state"][name], b["state"][name], strict=True))
    assert worst < 1e-4  # Adam amplifies rounding in near-zero gradients; losses above are the contract
