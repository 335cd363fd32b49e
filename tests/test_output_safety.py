"""Sentinel never deletes or replaces a file it did not write (issue #12, cases 1-3).

Output folders are checked before anything is written, a run folder is locked while a run uses
it, and outputs can never overlap their inputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core.cli import cli
from sentinel_core.errors import SentinelError
from sentinel_core.folders import MANIFEST, atomic_directory
from sentinel_core.model_io import load_model, save_model
from sentinel_core.run_lock import RunFolderBusy, RunLock


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result, *fragments):
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in last, result.output
    assert "Traceback" not in result.output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prune_args(assets, output_dir):
    return ["prune", "--model", assets["model"], "--scorer", "random", "--pruning-percent", "0.25",
            "--output-dir", output_dir, "--device", "cpu"]


# -- case 1: `sentinel prune --output-dir DIR` ------------------------------------------------------


@pytest.mark.parametrize("target", [".", ""])
def test_prune_into_the_current_folder_is_refused_and_touches_nothing(tiny_assets, target):
    Path("main.py").write_text("print('my work')\n")
    before = snapshot(Path.cwd())
    result = invoke(*prune_args(tiny_assets, target))
    one_error_line(result, "is the current folder or one above it")
    assert snapshot(Path.cwd()) == before


def test_prune_into_a_finished_run_folder_is_refused_and_touches_nothing(tiny_assets):
    run = tiny_assets["tmp"] / "finished-run"
    run.mkdir()
    for name in ("summary.json", "metrics.jsonl", "state.json", "loss.png"):
        (run / name).write_text("{}\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "note").write_text("kept\n")
    before = snapshot(run)
    one_error_line(invoke(*prune_args(tiny_assets, run)), "already holds files Sentinel did not write")
    assert snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir() if p.name.startswith(".")) == []  # no temp folders


def test_prune_output_that_overlaps_its_input_model_is_refused(tiny_assets):
    inside = Path(tiny_assets["model"]) / "pruned"
    one_error_line(invoke(*prune_args(tiny_assets, inside)), "lies inside the input model")
    assert not inside.exists()


def test_a_folder_sentinel_wrote_is_replaced_whole_and_anything_added_stops_that(tiny_assets):
    out = tiny_assets["tmp"] / "pruned"
    assert invoke(*prune_args(tiny_assets, out)).exit_code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}
    assert invoke(*prune_args(tiny_assets, out)).exit_code == 0  # its own folder: replaced atomically
    load_model(out)
    (out / "notes.txt").write_text("mine\n")
    one_error_line(invoke(*prune_args(tiny_assets, out)), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine\n"


def test_a_failed_save_leaves_the_previous_folder_and_no_temp_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="half-way"), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("half-way")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_model_refuses_a_file_and_a_foreign_folder(tmp_path):
    from surgery_fixtures import tiny_gpt2

    (tmp_path / "file").write_text("x")
    with pytest.raises(SentinelError, match="is a file"):
        save_model(tiny_gpt2(), None, tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2\n")
    with pytest.raises(SentinelError, match=r"'.*mine' already holds files Sentinel did not write \(data.csv\)"):
        save_model(tiny_gpt2(), None, tmp_path / "mine")


# -- case 2: a run folder that holds, or lies in, its inputs ---------------------------------------------


def run_args(model, data, output_dir):
    return ["run", "--model", model, "--data", data, "--scorer", "random", "--pruning-percent", "0.25",
            "--block-size", "32", "--batch-size", "4", "--test-mode", "--quiet", "--device", "cpu",
            "--output-dir", output_dir]


def test_a_run_into_a_folder_holding_its_input_model_is_refused(tiny_assets, monkeypatch):
    project = tiny_assets["tmp"] / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    Path(tiny_assets["model"]).rename(project / "model")
    Path(tiny_assets["data"]).rename(project / "data.txt")
    before = snapshot(project)
    one_error_line(invoke(*run_args("model", "data.txt", ".")), "already holds files that are not a Sentinel run")
    assert snapshot(project) == before


def test_a_run_folder_inside_the_input_model_is_refused(tiny_assets):
    out = Path(tiny_assets["model"]) / "run"
    one_error_line(invoke(*run_args(tiny_assets["model"], tiny_assets["data"], out)), "lies inside the input model")
    assert not out.exists()


def test_a_run_whose_model_fails_to_load_leaves_no_folder(tiny_assets):
    out = tiny_assets["tmp"] / "never"
    one_error_line(invoke(*run_args(tiny_assets["model"], str(tiny_assets["tmp"] / "missing.txt"), out)),
                   "missing.txt")
    assert not out.exists()


# -- case 3: a lock per run folder ---------------------------------------------------------------------


HOLDER = textwrap.dedent("""
    import sys, time
    from sentinel_core.run_lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def hold_lock(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_busy_folder_names_the_holder_and_a_dead_holder_frees_it(tiny_assets, capsys):
    out = tiny_assets["tmp"] / "busy"
    holder = hold_lock(out)
    try:
        result = invoke(*run_args(tiny_assets["model"], tiny_assets["data"], out))
        one_error_line(result, f"is in use by process {holder.pid} on", "wait for it to finish")
        assert sorted(p.name for p in out.iterdir()) == [".sentinel.lock", ".sentinel.lock.json"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    # The killed holder's lock is gone with its process; its record says who it was.
    with RunLock(out):
        pass
    assert f"taking over {str(out)!r} from process {holder.pid}" in capsys.readouterr().err
    result = invoke(*run_args(tiny_assets["model"], tiny_assets["data"], out))
    assert result.exit_code == 0, result.output


def test_two_locks_on_one_folder_in_one_process_exclude_each_other(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderBusy, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    RunLock(tmp_path / "run").acquire().release()


def test_two_runs_started_at_once_never_mix_their_files(tiny_assets):
    """Two real processes race for one folder: one runs, the other is refused before writing."""
    out = tiny_assets["tmp"] / "race"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "sentinel_core", *run_args(tiny_assets["model"], tiny_assets["data"], str(out))]
    procs = [subprocess.Popen([*cmd, "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for seed in (1, 2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    results = [(p.returncode, err) for p, (_, err) in zip(procs, outputs, strict=True)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "Error: output_dir" in loser and ("is in use by process" in loser or "holds an unfinished run" in loser
                                             or "already holds a finished run" in loser), loser
    experiment = json.loads((out / "experiment.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seed"] == experiment["seed"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    baselines = [e for e in events if e["stage"] == "evaluate" and e.get("label") == "baseline"]
    assert len(baselines) == 1  # one run's events only
