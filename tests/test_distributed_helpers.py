"""sentinel_core.distributed: what it does in one process (nothing but call through), and the same
helpers in two gloo processes, checked against values each process can compute alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sentinel_core import distributed
from sentinel_core.errors import SentinelError

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo back-end")


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_one_process_is_the_main_one_and_the_helpers_call_through(single_process):
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    distributed.start("cpu")  # no launch: no process group
    assert not dist.is_initialized()
    distributed.barrier()
    value = {"scores": [[0.5, None]], "tuple": (1, 2)}
    assert distributed.broadcast_json(value) is value  # no JSON round trip in one process
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert distributed.all_reduce_max([3, -1]) == [3.0, -1.0]
    assert distributed.on_main(lambda: (4, 5)) == (4, 5)
    assert distributed.main_first(lambda: "loaded") == "loaded"
    def refuse():
        raise SentinelError("bad value")

    with pytest.raises(SentinelError, match="bad value"):
        distributed.on_main(refuse)
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distributed.share_model(model, after="pruning")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert distributed.process_device("cuda") == "cuda"


def test_the_environment_names_the_process_before_the_group_exists(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (2, 1, False)
    assert distributed.process_device("cuda") == "cuda:1"  # each process its own GPU
    assert distributed.process_device("cpu") == "cpu"


def test_observers_hear_the_main_process_only(monkeypatch, register_plugin):
    from sentinel_core.hookspecs import hookimpl
    from sentinel_core.plugins import emit

    heard = []

    class Listener:
        @hookimpl
        def on_metric(self, event):
            heard.append(event.stage)

    register_plugin(Listener(), "listener")
    emit("evaluate", loss=1.0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    emit("evaluate", loss=2.0)
    assert heard == ["evaluate"]


def test_split_evaluation_in_one_process_is_the_plain_evaluation(single_process):
    from data_fixtures import tiny_gpt2

    from sentinel_core.evaluation import evaluate

    model = tiny_gpt2(97, n_positions=32)
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(0))
    plain = evaluate(model, ids, block_size=16, stride=8, batch_size=3)
    split = evaluate(model, ids, block_size=16, stride=8, batch_size=3, split_over_processes=True)
    assert (split.loss, split.tokens, split.input_tokens) == (plain.loss, plain.tokens, plain.input_tokens)


# -- two processes -------------------------------------------------------------------------------


@needs_gloo
def test_two_processes_share_what_the_main_one_has(tmp_path):
    import torch.multiprocessing as mp
    from distributed_helpers_worker import free_port, two_process_worker

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    shared = str(tmp_path / "shared.txt")
    workers = [context.Process(target=two_process_worker, args=(rank, port, queue, shared)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    try:
        results = dict(queue.get(timeout=120) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():  # a hang: end the workers this test started
                worker.terminate()
    assert all(isinstance(v, dict) for v in results.values()), results
    zero, one = results[0], results[1]
    assert (zero["world"], zero["rank"], one["rank"]) == (2, 0, 1)
    # JSON on both sides, the main process's value everywhere (the tuple a list on both).
    assert math.isnan(zero["json"].pop("nan")) and math.isnan(one["json"].pop("nan"))
    assert zero["json"] == one["json"] == {"heads": {"0": [1, 3]}, "pair": [1, 2]}
    assert zero["sum"] == one["sum"] == [0.25 + 1.25, 20.0]
    assert zero["max"] == one["max"] == [1.0, 0.0]
    assert zero["on_main"] == one["on_main"] == "decided by 0"
    assert zero["error"] == ["SentinelError", "folder 'x' is taken; pick another"]
    assert one["error"] == ["MainProcessFailed", "folder 'x' is taken; pick another"]
    # Ctrl-C in the main process's work stops the others as an interrupt (exit code 130), not an error.
    assert (zero["interrupt"], one["interrupt"]) == (["KeyboardInterrupt", ""], ["RunInterrupted", "Ctrl-C"])
    assert zero["loaded"] == one["loaded"] == "written by process 0"
    assert zero["weights"] == one["weights"]
    torch.manual_seed(0)  # what the main process built
    reference = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    assert zero["weights"] == [p.detach().flatten().tolist() for p in reference.parameters()]
    # Another layout in one process stops both (neither waits in a broadcast that cannot match).
    assert "after pruning, process 1 holds ['weight', [5, 3], 'torch.float32'] where process 0 holds " \
           "['weight', [4, 3], 'torch.float32']" in one["layout_error"]
    assert "after pruning, process 1 changed the model differently from process 0" in zero["layout_error"]
