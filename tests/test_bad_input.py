"""Every bad input is one line and a non-zero exit; interruptions exit 130/143 (issue #12, cases 4-12)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core.cli import cli


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def one_error_line(result, *fragments, code=1):
    assert result.exit_code == code, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in last, result.output
    assert "Traceback" not in result.output


def sentinel_process(*args, **popen):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sentinel_core", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def long_run_args(assets, out):
    return ["run", "--model", assets["model"], "--data", assets["data"], "--scorer", "random",
            "--pruning-percent", "0.25", "--block-size", "32", "--batch-size", "4", "--max-steps", "100000",
            "--num-epochs", "1000", "--quiet", "--device", "cpu", "--output-dir", out]


def wait_for_training(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        metrics = out / "metrics.jsonl"
        if metrics.exists() and '"stage": "fine_tune", "step": 2' in metrics.read_text():
            return
        time.sleep(0.2)
    raise AssertionError("the run never reached fine-tuning")


# -- case 4: exit codes after Ctrl-C and SIGTERM -------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_exits_with_the_signal_code_and_says_how_to_resume(tiny_assets, signum, code):
    out = tiny_assets["tmp"] / "run"
    proc = sentinel_process(*long_run_args(tiny_assets, out))
    wait_for_training(out, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"resume with `sentinel run --resume {out}`" in stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr


def test_sigterm_outside_training_exits_143(tiny_assets):
    proc = sentinel_process("generate", "--model", tiny_assets["model"], "--device", "cpu", stdin=subprocess.PIPE)
    deadline = time.monotonic() + 120
    line = ""
    while "Type a prompt" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr


# -- case 5: strict JSON, and a non-finite result is an error ---------------------------------------------------


def overflowing_model(assets) -> str:
    """Finite weights whose activations overflow float32: the loss is NaN."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(3e38)
        model.transformer.ln_f.bias.fill_(3e38)
    path = assets["tmp"] / "overflow"
    model.save_pretrained(path)
    for name in os.listdir(assets["model"]):
        if name.startswith(("tokenizer", "vocab", "merges", "special")):
            (path / name).write_bytes((Path(assets["model"]) / name).read_bytes())
    return str(path)


def test_evaluate_json_is_strict_and_a_non_finite_loss_fails(tiny_assets):
    model = overflowing_model(tiny_assets)
    result = invoke("evaluate", "--model", model, "--data", tiny_assets["data"], "--block-size", "32",
                    "--max-blocks", "4", "--json", "--device", "cpu")
    assert result.exit_code == 1
    text = result.stdout
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert record["finite"] is False and record["loss"] is None and record["perplexity"] is None
    assert result.stderr.strip().splitlines()[-1].startswith("Error: the loss of")


def nan_model(assets) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[0, 0] = float("nan")
    path = assets["tmp"] / "nan-model"
    model.save_pretrained(path)
    for name in os.listdir(assets["model"]):
        if not name.endswith(".safetensors") and name != "config.json":
            (path / name).write_bytes((Path(assets["model"]) / name).read_bytes())
    return str(path)


@pytest.mark.parametrize("command", ["evaluate", "run", "generate", "score"])
def test_a_model_with_nan_weights_is_refused_in_one_line(tiny_assets, command):
    model = nan_model(tiny_assets)
    args = {"evaluate": ["evaluate", "--model", model, "--data", tiny_assets["data"], "--block-size", "32", "--json"],
            "run": ["run", "--model", model, "--data", tiny_assets["data"], "--block-size", "32", "--test-mode",
                    "--quiet", "--output-dir", tiny_assets["tmp"] / "out"],
            "generate": ["generate", "--model", model, "hello"],
            "score": ["score", "--model", model, "--scorer", "random"]}[command]
    result = invoke(*args, "--device", "cpu")
    one_error_line(result, "has NaN or infinite weights (first in transformer.h.1.attn.c_attn.weight)")
    assert not (tiny_assets["tmp"] / "out").exists()


# -- cases 6 and 8: weights only from safetensors; unreadable files are one line -------------------------------


class _Pwn:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def test_a_pickle_is_never_loaded(tiny_assets):
    model = Path(tiny_assets["model"])
    (model / "model.safetensors").unlink()
    with open(model / "pytorch_model.bin", "wb") as handle:
        pickle.dump(_Pwn(), handle)
    result = invoke("evaluate", "--model", model, "--data", tiny_assets["data"], "--block-size", "32")
    one_error_line(result, "holds its weights only as a pickle (pytorch_model.bin)", "safetensors only")
    assert not (Path.cwd() / "pwned").exists()


def test_safetensors_win_over_a_pickle_beside_them(tiny_assets):
    model = Path(tiny_assets["model"])
    with open(model / "pytorch_model.bin", "wb") as handle:
        pickle.dump(_Pwn(), handle)
    result = invoke("evaluate", "--model", model, "--data", tiny_assets["data"], "--block-size", "32",
                    "--max-blocks", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert not (Path.cwd() / "pwned").exists()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_safetensors_are_one_line(tiny_assets):
    plain = Path(tiny_assets["model"])
    sentinel = tiny_assets["tmp"] / "pruned"
    assert invoke("prune", "--model", plain, "--scorer", "random", "--pruning-percent", "0.25",
                  "--output-dir", sentinel, "--device", "cpu").exit_code == 0
    truncate(plain / "model.safetensors")
    truncate(sentinel / "sentinel.safetensors")
    for model in (plain, sentinel):
        result = invoke("generate", "--model", model, "hello", "--device", "cpu")
        one_error_line(result, "unreadable", "truncated")


# -- case 7: non-finite settings --------------------------------------------------------------------------


def test_infinite_settings_are_refused_before_anything_runs(tmp_path):
    one_error_line(invoke("run", "--learning-rate", "inf"), "learning_rate must be a finite number, got inf")
    toml = tmp_path / "exp.toml"
    toml.write_text("max_grad_norm = inf\n")
    one_error_line(invoke("run", "--config", toml), "max_grad_norm must be a finite number, got inf")
    assert not Path("sentinel_output").exists()


# -- case 9: a NaN weight no longer crashes sampling: covered by the NaN-weights test above --------------------


# -- case 11: data that is not UTF-8 ------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"caf\xe9 au lait\nsecond line\n" * 50, bytes(range(256)) * 20])
def test_data_that_is_not_utf8_names_the_file_and_the_byte(tiny_assets, content):
    data = tiny_assets["tmp"] / "latin.txt"
    data.write_bytes(content)
    offset = content.index(next(b for b in (bytes([i]) for i in range(128, 256)) if b in content))
    result = invoke("evaluate", "--model", tiny_assets["model"], "--data", data, "--block-size", "32")
    one_error_line(result, f"is not UTF-8 text (byte 0x{content[offset]:02x} at offset {offset})", "iconv")


# -- case 12: the smaller ones -----------------------------------------------------------------------------


def test_a_block_size_beyond_the_models_positions_names_the_limit(tiny_assets):
    result = invoke("evaluate", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                    "--block-size", "100000")
    one_error_line(result, "block_size 100000 exceeds the 64 positions of model", "--block-size 64 or less")


def test_a_model_path_that_is_a_file_says_so(tiny_assets):
    result = invoke("generate", "--model", tiny_assets["data"], "hello")
    one_error_line(result, "is a file; give the folder that holds config.json")


@pytest.mark.parametrize("flag", ["--max-blocks", "--batch-size", "--block-size"])
def test_evaluate_names_a_bad_count_flag(tiny_assets, flag):
    result = invoke("evaluate", "--model", tiny_assets["model"], flag, "0")
    assert result.exit_code == 2
    assert f"Invalid value for '{flag}'" in result.output and "Traceback" not in result.output


def test_an_unexpected_error_is_one_line_and_verbose_shows_the_traceback(tiny_assets, monkeypatch):
    import sentinel_core.evaluation as evaluation

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(evaluation, "evaluate", broken)
    args = ["evaluate", "--model", tiny_assets["model"], "--data", tiny_assets["data"], "--block-size", "32"]
    one_error_line(invoke(*args), "RuntimeError: something inside broke (run with -v for the traceback)")
    verbose = invoke("-v", *args)
    assert verbose.exit_code == 1 and "Traceback" in verbose.output and "raise RuntimeError" in verbose.output


def test_the_demo_build_says_how_to_continue_after_ctrl_c(tmp_path, monkeypatch, capsys):
    from sentinel_core.demo import TINY, ensure_demo_model
    from sentinel_core.hookspecs import hookimpl
    from sentinel_core.plugins import pm

    class StopAtStep:
        @hookimpl
        def on_metric(self, event):
            if event.step == 3 and "loss" in event.values:
                raise KeyboardInterrupt  # what Ctrl-C during a metric hook looks like

    stopper = StopAtStep()
    pm.register(stopper)
    try:
        with pytest.raises(KeyboardInterrupt):
            ensure_demo_model(quiet=True, spec=TINY, cache_dir=tmp_path)
    finally:
        pm.unregister(stopper)
    err = capsys.readouterr().err
    assert "the demo model's training is saved at step 3; run the same command again" in err
    assert "train()" not in err
