"""The experiment pipeline: load, evaluate, score, prune, fine-tune, (grow, fine-tune), evaluate, save.

Every stage reports through ``on_metric``. After each stage the run records what it finished in
``state.json`` and, where the model changed, a checkpoint, so ``resume_experiment`` can pick up
an interrupted run where it stopped; the fine-tuner keeps its own step checkpoints within a stage.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from . import __version__, distributed, plugins, run_measures
from .config import ExperimentConfig, resolve_device
from .errors import SentinelError
from .fileio import read_json, write_json_atomic
from .folders import LOCK_FILES, check_no_overlap, check_run_folder
from .kv_cache import kv_cache_bytes_per_token
from .launch import start_processes
from .plugins import emit, pm
from .run_files import FINAL_MODEL_DIR, RUN_CONFIG_FILE, RUN_STATE_FILE, RUN_SUMMARY_FILE, STAGE_CHECKPOINTS_DIR
from .run_lock import RunLock
from .tracking import ProgressTracker

# Stages that change the model (and their rounds, e.g. prune_round2) end with a checkpoint in
# checkpoints/<stage>.
_MODEL_STAGES = ("prune", "fine_tune", "grow")


def run_experiment(config: ExperimentConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Run the whole pipeline for ``config``; returns ``(model, tokenizer, summary)``.

    ``output_dir`` must be new or empty (see docs/output-folders.md): a folder holding a run is
    refused, so results are never overwritten by accident (resume an unfinished one, or pick
    another folder), and so is a folder holding anything else. The folder is locked while the
    run uses it.
    """
    plugins.check_run(config)  # strategy names and options: the cheapest mistakes, reported first
    run_measures.check_run_extras(config)  # trackers installed, lm-eval tasks and their data loadable
    output_dir = Path(config.output_dir)
    start_processes(config)
    lock = RunLock(output_dir)
    # Under a launch the main process claims the folder; the others go on once it has.
    distributed.on_main(lambda: _claim_new_folder(config, output_dir, lock))
    try:
        run = _Run(config, state={"completed": [], "results": {}, "finished": False})
        try:
            return run.execute()
        except BaseException:
            if not run.started and distributed.is_main():
                _remove_empty_start(output_dir, created=lock.created_folder)
            raise
    finally:
        lock.release()


def resume_experiment(output_dir: str | Path, **display: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Continue the run saved in ``output_dir`` from its last finished stage.

    ``display`` may change settings that only change what is shown (``quiet``, ...); the run
    continues with the rest of the settings it was started with.
    """
    from .config import display_only_fields

    changing = sorted(set(display) - display_only_fields())
    if changing:
        raise SentinelError(f"resume_experiment continues with the run's own settings; {changing[0]!r} cannot "
                            f"change (only {', '.join(sorted(display_only_fields()))} can)")
    output_dir = Path(output_dir)
    if not (output_dir / RUN_STATE_FILE).is_file() or not (output_dir / RUN_CONFIG_FILE).is_file():
        raise SentinelError(f"{str(output_dir)!r} holds no Sentinel run to resume (no {RUN_STATE_FILE}); "
                            "pass the --output-dir of an earlier `sentinel run`")
    if distributed.world_size() > 1:  # the processes join first: the main one reads the run for all
        start_processes(ExperimentConfig.from_dict(read_json(output_dir / RUN_CONFIG_FILE)))
    lock = RunLock(output_dir)
    # The main process reads the run under the lock; every process continues from what it read.
    saved = distributed.on_main(lambda: _open_unfinished_run(output_dir, lock))
    try:
        config = ExperimentConfig.from_dict(saved["config"])
        state = saved["state"]
        plugins.check_run(config)
        config = config.replace(output_dir=str(output_dir), **display)
        run_measures.check_run_extras(config)
        return _Run(config, state=state).execute()
    finally:
        lock.release()


def _claim_new_folder(config: ExperimentConfig, output_dir: Path, lock: RunLock) -> None:
    """Refuse a folder that holds a run or anything else, then lock it."""
    if check_run_folder(output_dir):
        _refuse_existing_run(output_dir)
    check_no_overlap(output_dir, {"model": config.model_name, "data": config.data}, what="output_dir")
    lock.acquire()
    if check_run_folder(output_dir):  # another run started here while we looked
        lock.release()
        _refuse_existing_run(output_dir)


def _open_unfinished_run(output_dir: Path, lock: RunLock) -> dict[str, Any]:
    """Lock the run folder and read the run's config and state; refuse a finished run."""
    lock.acquire()
    try:
        config = read_json(output_dir / RUN_CONFIG_FILE)
        state = read_json(output_dir / RUN_STATE_FILE)
        if state.get("finished"):
            raise SentinelError(f"the run in {str(output_dir)!r} already finished; see {RUN_SUMMARY_FILE}")
    except BaseException:
        lock.release()
        raise
    return {"config": config, "state": state}


def _refuse_existing_run(output_dir: Path) -> None:
    if read_json(output_dir / RUN_STATE_FILE).get("finished"):
        raise SentinelError(f"output_dir {str(output_dir)!r} already holds a finished run; "
                            "choose another --output-dir or delete it")
    raise SentinelError(
        f"output_dir {str(output_dir)!r} holds an unfinished run; continue it with "
        f"`sentinel run --resume {output_dir}` or choose another --output-dir"
    )


def _remove_empty_start(output_dir: Path, *, created: bool) -> None:
    """After a run failed before writing anything: leave the folder as it was found."""
    for name in LOCK_FILES:
        (output_dir / name).unlink(missing_ok=True)
    if created:
        try:
            output_dir.rmdir()
        except OSError:  # not empty after all: someone else's file arrived; leave it
            pass


def effective_config(config: ExperimentConfig) -> ExperimentConfig:
    """Apply ``test_mode``: a few steps on a little data, enough to exercise every stage."""
    if not config.test_mode:
        return config
    return config.replace(
        max_steps=min(config.max_steps or 6, 6),
        max_eval_blocks=min(config.max_eval_blocks or 8, 8),
        calibration_batches=min(config.calibration_batches, 2),
        eval_every=min(config.eval_every, 3),
        checkpoint_every=min(config.checkpoint_every, 3),
        speed_repeats=min(config.speed_repeats, 2),
    )


class _Run:
    def __init__(self, config: ExperimentConfig, state: dict[str, Any]):
        # What runs: test mode applied, every strategy option checked and its default filled in.
        self.config = plugins.check_run(effective_config(config))
        self.requested = config
        self.state = state
        self.output_dir = Path(config.output_dir)
        self.timings: dict[str, float] = dict(state.get("timings", {}))
        # True once the run has written its first file (experiment.json): from then on the folder
        # is a run folder that `--resume` can continue.
        self.started = False

    # -- bookkeeping -------------------------------------------------------------------------

    def _done(self, stage: str) -> bool:
        return stage in self.state["completed"]

    def _finish(self, stage: str, seconds: float, **results: Any) -> None:
        self.state["completed"].append(stage)
        self.state["results"].update(results)
        self.timings[stage] = round(seconds, 3)
        self.state["timings"] = self.timings
        if stage.startswith(_MODEL_STAGES):
            from .model_io import save_model

            if distributed.is_main():
                save_model(self.model, self.tokenizer, self.output_dir / STAGE_CHECKPOINTS_DIR / stage)
            self.state["last_model_checkpoint"] = stage
        if distributed.is_main():
            write_json_atomic(self.output_dir / RUN_STATE_FILE, self.state)

    # -- the pipeline ------------------------------------------------------------------------

    def execute(self) -> tuple[Any, Any, dict[str, Any]]:
        import transformers

        if self.config.quiet:
            quiet_libraries()
        transformers.set_seed(self.config.seed)
        self.device = distributed.process_device(resolve_device(self.config.device))
        # Model and data first: a bad path or an unreadable file is reported before the run
        # writes anything, so it leaves no half-started run folder behind. Under a launch the
        # main process loads first (filling the caches) and the others after it.
        distributed.main_first(self._load)
        if distributed.is_main():
            write_json_atomic(self.output_dir / RUN_CONFIG_FILE, self.requested.to_dict())
            write_json_atomic(self.output_dir / RUN_STATE_FILE, self.state)
        self.started = True
        plugins.start_run()
        tracker = ProgressTracker(self.output_dir) if distributed.is_main() else None
        if tracker is not None:
            pm.register(tracker)
        try:
            plugins.notify("on_run_start", config=self.requested, run_dir=self.output_dir)
            return self._stages()
        finally:
            if tracker is not None:
                pm.unregister(tracker)
                tracker.close()

    def _stages(self) -> tuple[Any, Any, dict[str, Any]]:
        c = self.config  # _load may have filled in the demo model's settings

        if not self._done("baseline"):
            start = time.perf_counter()
            baseline = self._evaluate("baseline")
            sample = self._sample("baseline")
            tasks = distributed.on_main(
                lambda: run_measures.task_scores(self.model, self.tokenizer, c, self.device, "baseline"))
            self._finish("baseline", time.perf_counter() - start, baseline=baseline, sample_before=sample,
                         parameters_before=self._parameters(), heads_original=self._head_counts(),
                         kv_cache_before=kv_cache_bytes_per_token(self.model), tasks_baseline=tasks)

        for round_ in range(1, c.prune_rounds + 1):
            self._prune_round(round_)

        if c.growth_strategy and c.growth_percent > 0:
            if not self._done("grow"):
                start = time.perf_counter()
                grown = plugins.grow_heads(c.growth_strategy, model=self.model, data=self.data, config=c)
                self.model.to(self.device)
                distributed.share_model(self.model, after="growth")
                emit("grow", heads_grown=grown.count, heads_active=self._heads_active())
                self._finish("grow", time.perf_counter() - start,
                             grown={str(k): v for k, v in grown.heads.items()})
            if not self._done("fine_tune_growth"):
                start = time.perf_counter()
                tuned = plugins.fine_tune(c.fine_tune, model=self.model, tokenizer=self.tokenizer, data=self.data,
                                          config=c, stage="fine_tune_growth", **self._fine_tune_context())
                self._finish("fine_tune_growth", time.perf_counter() - start,
                             fine_tune_growth={"steps": tuned.steps, "best_eval_loss": tuned.best_eval_loss})

        if not self._done("final"):
            start = time.perf_counter()
            final = self._evaluate("final")
            sample = self._sample("final")
            tasks = distributed.on_main(
                lambda: run_measures.task_scores(self.model, self.tokenizer, c, self.device, "final"))
            self._finish("final", time.perf_counter() - start, final=final, sample_after=sample,
                         parameters_after=self._parameters(), heads_final=self._head_counts(),
                         kv_cache_after=kv_cache_bytes_per_token(self.model), tasks_final=tasks)

        if not self._done("speed"):
            start = time.perf_counter()
            speed = distributed.on_main(lambda: run_measures.measure_speed(
                self.model, self.state["sources"]["model"], self.data.validation.blocks, c, self.device))
            self._finish("speed", time.perf_counter() - start, speed=speed)

        summary = self._summary()
        distributed.on_main(lambda: self._save(summary))
        return self.model, self.tokenizer, summary

    # -- stages' parts -----------------------------------------------------------------------

    def _load(self) -> None:
        from .data import load_data
        from .defaults import demo_run_config, is_demo_model, resolve_data, resolve_model_and_data
        from .model_io import check_model_inputs, load_model

        checkpoint = self.state.get("last_model_checkpoint")
        model_source, data_source = resolve_model_and_data(self.config, announce=not checkpoint)
        if is_demo_model(model_source):
            self.config = plugins.check_run(demo_run_config(self.config))
        c = self.config
        if checkpoint:
            model_source = str(self.output_dir / STAGE_CHECKPOINTS_DIR / checkpoint)
        self.model, self.tokenizer = load_model(
            model_source, device=self.device, attn_implementation=c.attn_implementation, dtype=c.dtype,
            trust_remote_code=c.trust_remote_code,
        )
        self.model.eval()
        check_model_inputs(self.model, self.tokenizer, model_source, c.block_size)
        self.data = load_data(resolve_data(data_source), self.tokenizer, block_size=c.block_size, seed=c.seed)
        self.state.setdefault("sources", {"model": model_source, "data": data_source})

    def _prune_round(self, round_: int) -> None:
        """Score, prune to ``round_ / prune_rounds`` of the target, and recover with that round's
        share of the fine-tuning steps. One round (the default) is one-shot pruning."""
        c = self.config
        rounds = c.prune_rounds
        suffix = "" if round_ == 1 else f"_round{round_}"
        target = c.pruning_percent * round_ / rounds
        results = self.state["results"]
        if not self._done("score" + suffix):
            start = time.perf_counter()
            # Scored once, by the main process; every process prunes from the same scores.
            record = distributed.on_main(lambda: self._score(round_).to_dict())
            self._finish("score" + suffix, time.perf_counter() - start, scores=record)

        if not self._done("prune" + suffix):
            start = time.perf_counter()
            scores = _scores_from_dict(results["scores"])
            pruned = plugins.prune(c.prune_strategy, model=self.model, scores=scores,
                                   config=c.replace(pruning_percent=target))
            self.model.to(self.device)
            distributed.share_model(self.model, after="pruning")
            emit("prune", heads_removed=pruned.count, mode=pruned.mode, heads_active=self._heads_active(),
                 round=round_, rounds=rounds, pruning_percent=target)
            after = self._evaluate("pruned" if round_ == rounds else f"pruned_round{round_}")
            removed = {str(k): sorted(set(results.get("removed", {}).get(str(k), [])) | set(v))
                       for k, v in pruned.heads.items()}
            self._finish("prune" + suffix, time.perf_counter() - start, pruned=after,
                         removed={**results.get("removed", {}), **removed}, prune_mode=pruned.mode,
                         rounds=[*results.get("rounds", [])[: round_ - 1],
                                 {"round": round_, "pruning_percent": target, "heads_removed": pruned.count,
                                  "perplexity_pruned": after["perplexity"]}])

        stage = "fine_tune" + suffix
        if not self._done(stage):
            start = time.perf_counter()
            steps = self._round_steps(round_)
            # Each round trains on a fresh order of the data, not the first round's batches again.
            round_config = c if rounds == 1 else c.replace(max_steps=steps, seed=c.seed + round_ - 1)
            tuned = plugins.fine_tune(c.fine_tune, model=self.model, tokenizer=self.tokenizer, data=self.data,
                                      config=round_config, stage=stage, **self._fine_tune_context())
            record = {"steps": tuned.steps, "best_eval_loss": tuned.best_eval_loss}
            rounds_done = [dict(item) for item in results.get("rounds", [])]
            if rounds_done:
                rounds_done[-1]["fine_tune"] = record
            totals = results.get("fine_tune") or {"steps": 0}
            self._finish(stage, time.perf_counter() - start, rounds=rounds_done,
                         fine_tune={"steps": (totals["steps"] if round_ > 1 else 0) + tuned.steps,
                                    "best_eval_loss": tuned.best_eval_loss})

    def _round_steps(self, round_: int) -> int:
        """Round ``round_``'s share of the steps one-shot fine-tuning would take (the shares add up)."""
        c = self.config
        world = distributed.world_size()
        per_epoch = int(self.data.train.blocks.shape[0]) // (c.batch_size * c.gradient_accumulation_steps * world)
        total = c.num_epochs * per_epoch
        total = min(total, c.max_steps) if c.max_steps else total
        steps = total * round_ // c.prune_rounds - total * (round_ - 1) // c.prune_rounds
        return max(1, steps)

    def _fine_tune_context(self) -> dict[str, Any]:
        """What a fine-tuner may use besides the model: the model before pruning, the run folder."""
        return {"original_model": self.state["sources"]["model"], "run_dir": str(self.output_dir)}

    def _score(self, round_: int):
        c = self.config
        scores = plugins.score_heads(c.scorer, model=self.model, batches=self._calibration_batches(), config=c)
        emit("score", strategy=c.scorer, scores=scores.scores, tokens_seen=scores.tokens_seen,
             seconds=scores.seconds, round=round_)
        return scores

    def _calibration_batches(self) -> list[dict[str, Any]]:
        from .data import calibration_batches

        c = self.config
        return calibration_batches(self.data.train.blocks, c.batch_size, c.calibration_batches, c.seed)

    def _eval_ids(self):
        ids = self.data.validation.ids
        if self.config.max_eval_blocks:
            ids = ids[: self.config.max_eval_blocks * self.config.block_size]
        return ids

    def _evaluate(self, stage: str) -> dict[str, float]:
        from .evaluation import evaluate

        c = self.config
        result = evaluate(self.model, self._eval_ids(), block_size=c.block_size, stride=c.eval_stride,
                          batch_size=c.batch_size, device=self.device, progress=not c.quiet,
                          split_over_processes=True)
        values = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
                  "tokens_per_second": result.tokens_per_second}
        # Keep-best and early stopping choose on the validation blocks, so the honest figure of
        # quality is the test split's, which nothing selects on (when the data has one).
        test_ids = self._test_ids()
        if test_ids is not None:
            test = evaluate(self.model, test_ids, block_size=c.block_size, stride=c.eval_stride,
                            batch_size=c.batch_size, device=self.device, progress=not c.quiet,
                            split_over_processes=True)
            values.update(test_loss=test.loss, test_perplexity=test.perplexity, test_tokens=test.tokens)
        emit("evaluate", label=stage, heads_active=self._heads_active(), **values)
        return values

    def _test_ids(self):
        test = self.data.test
        if test is None or test.ids.numel() < 2:
            return None
        ids = test.ids
        if self.config.max_eval_blocks:
            ids = ids[: self.config.max_eval_blocks * self.config.block_size]
        return ids

    def _sample(self, stage: str) -> str:
        from .generation import generate_text

        prompt = self.config.sample_prompt
        text = distributed.on_main(lambda: generate_text(  # one sample per run, by the main process
            self.model, self.tokenizer, prompt, max_new_tokens=20 if self.config.test_mode else 60,
            seed=self.config.seed))
        emit("sample", label=stage, prompt=prompt, text=text)
        return text

    def _heads_active(self) -> list[int]:
        from .surgery import get_head_map

        head_map = get_head_map(self.model)
        return [len(head_map.active(layer)) for layer in range(head_map.num_layers)]

    def _head_counts(self) -> dict[str, Any]:
        from .surgery import get_head_map

        head_map = get_head_map(self.model)
        active = self._heads_active()
        return {"per_layer": active, "total": sum(active),
                "grown": sum(len(head_map.grown(layer)) for layer in range(head_map.num_layers))}

    def _parameters(self) -> dict[str, int]:
        from .evaluation import count_parameters

        return count_parameters(self.model)

    # -- results -----------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        import torch
        import transformers

        r = self.state["results"]
        original = self._head_count_original()
        final = r["heads_final"]["total"]
        removed = sum(len(v) for v in r.get("removed", {}).values())
        grown = sum(len(v) for v in r.get("grown", {}).values())
        before, after = r["baseline"], r["final"]
        return {
            "output_dir": str(self.output_dir),
            "model": self.state["sources"]["model"],
            "data": self.state["sources"]["data"],
            "perplexity": {"baseline": before["perplexity"], "pruned": r["pruned"]["perplexity"],
                           "final": after["perplexity"]},
            # The test split's (None without one): nothing selected on it, unlike validation.
            "test_perplexity": {"baseline": before.get("test_perplexity"),
                                "pruned": r["pruned"].get("test_perplexity"),
                                "final": after.get("test_perplexity")} if "test_perplexity" in after else None,
            "heads": {"original": original, "removed": removed, "grown": grown, "final": final,
                      "per_layer_final": r["heads_final"]["per_layer"], "removed_heads": r.get("removed", {}),
                      "grown_heads": r.get("grown", {}), "prune_mode": r.get("prune_mode")},
            "parameters": {"before": r["parameters_before"], "after": r["parameters_after"]},
            "kv_cache": run_measures.kv_cache_summary(r),
            "speed": run_measures.speed_summary(r),
            "tasks": run_measures.tasks_summary(r),
            "fine_tune": r.get("fine_tune"),
            "prune_rounds": r.get("rounds"),
            "fine_tune_growth": r.get("fine_tune_growth"),
            "samples": {"before": r.get("sample_before"), "after": r.get("sample_after")},
            "timings_seconds": self.timings,
            "versions": {"sentinel-core": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version(),
                         "plugins": {p["name"]: p["version"] for p in _plugin_versions()}},
            "config": self.requested.to_dict(),
            # What actually ran: test mode and the demo model's defaults filled in.
            "effective_config": self.config.to_dict(),
        }

    def _head_count_original(self) -> int:
        from .surgery import get_head_map

        head_map = get_head_map(self.model)
        return head_map.num_layers * head_map.original_num_heads

    def _save(self, summary: dict[str, Any]) -> None:
        from .defaults import is_demo_model
        from .model_card import facts_from_summary
        from .model_io import save_model

        card = facts_from_summary(summary, demo=is_demo_model(self.state["sources"]["model"]))
        save_model(self.model, self.tokenizer, self.output_dir / FINAL_MODEL_DIR, card=card)
        export_error = self._export(summary, card)
        write_json_atomic(self.output_dir / RUN_SUMMARY_FILE, summary)
        try:
            from .plots import plot_run
        except ImportError:  # matplotlib is a dependency; this guards a broken backend only
            plot_run = None
        if plot_run is not None:
            plot_run(self.output_dir)
        self.state["finished"] = True
        write_json_atomic(self.output_dir / RUN_STATE_FILE, self.state)
        plugins.notify("on_run_end", summary=summary, run_dir=self.output_dir)
        if export_error:
            raise SentinelError(f"the run finished and its model is in {self.output_dir / FINAL_MODEL_DIR}, but the "
                                f"{self.config.export} export failed: {export_error}")

    def _export(self, summary: dict[str, Any], card: dict[str, Any]) -> str | None:
        """``--export``: a stock checkpoint in ``export/``, recorded in the summary; the error, if any.

        A model the format cannot express does not cost the run: the summary records the error,
        the run is marked finished, and the error is raised after that.
        """
        if not self.config.export:
            return None
        from .export import EXPORT_DIR, export_model

        try:
            report = export_model(self.model, self.tokenizer, self.output_dir / EXPORT_DIR, format=self.config.export,
                                  quiet=self.config.quiet, card=card)
        except SentinelError as exc:
            summary["export"] = {"format": self.config.export, "error": str(exc)}
            return str(exc)
        summary["export"] = report.to_dict()
        return None


def quiet_libraries() -> None:
    """Silence the progress bars of datasets and transformers (``--quiet``)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _plugin_versions() -> list[dict[str, Any]]:
    from .plugins import list_plugins

    return list_plugins()


def _scores_from_dict(record: dict[str, Any]):
    import torch

    from .results import HeadScores

    rows = [[float("nan") if v is None else v for v in row] for row in record["scores"]]
    return HeadScores(scores=torch.tensor(rows, dtype=torch.float32), strategy=record["strategy"],
                      tokens_seen=record.get("tokens_seen", 0), seconds=record.get("seconds", 0.0),
                      extra=record.get("extra", {}))
