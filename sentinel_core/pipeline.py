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

from . import __version__, hooks
from .config import ExperimentConfig, resolve_device
from .errors import SentinelError
from .fileio import read_json, write_json_atomic
from .metrics import emit
from .plugins import load_plugins, pm
from .tracking import ProgressTracker

STATE_FILE = "state.json"
CONFIG_FILE = "experiment.json"
SUMMARY_FILE = "summary.json"
SAMPLE_PROMPT = "The"

# Stages that change the model end with a checkpoint in checkpoints/<stage>.
_MODEL_STAGES = ("prune", "fine_tune", "grow", "fine_tune_growth")


def run_experiment(config: ExperimentConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Run the whole pipeline for ``config``; returns ``(model, tokenizer, summary)``.

    Starting a run in an ``output_dir`` that already holds a run is refused, so results are
    never overwritten by accident: resume an unfinished one, or pick another directory.
    """
    output_dir = Path(config.output_dir)
    state_path = output_dir / STATE_FILE
    if state_path.exists():
        if read_json(state_path).get("finished"):
            raise SentinelError(f"output_dir {str(output_dir)!r} already holds a finished run; "
                                "choose another --output-dir or delete it")
        raise SentinelError(
            f"output_dir {str(output_dir)!r} holds an unfinished run; continue it with "
            f"`sentinel run --resume {output_dir}` or choose another --output-dir"
        )
    return _Run(config, state={"completed": [], "results": {}, "finished": False}).execute()


def resume_experiment(output_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """Continue the run saved in ``output_dir`` from its last finished stage."""
    output_dir = Path(output_dir)
    if not (output_dir / STATE_FILE).is_file() or not (output_dir / CONFIG_FILE).is_file():
        raise SentinelError(f"{str(output_dir)!r} holds no Sentinel run to resume (no {STATE_FILE}); "
                            "pass the --output-dir of an earlier `sentinel run`")
    config = ExperimentConfig.from_dict(read_json(output_dir / CONFIG_FILE))
    state = read_json(output_dir / STATE_FILE)
    if state.get("finished"):
        raise SentinelError(f"the run in {str(output_dir)!r} already finished; see {SUMMARY_FILE}")
    return _Run(config.replace(output_dir=str(output_dir)), state=state).execute()


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
    )


class _Run:
    def __init__(self, config: ExperimentConfig, state: dict[str, Any]):
        self.config = effective_config(config)
        self.requested = config
        self.state = state
        self.output_dir = Path(config.output_dir)
        self.timings: dict[str, float] = dict(state.get("timings", {}))

    # -- bookkeeping -------------------------------------------------------------------------

    def _done(self, stage: str) -> bool:
        return stage in self.state["completed"]

    def _finish(self, stage: str, seconds: float, **results: Any) -> None:
        self.state["completed"].append(stage)
        self.state["results"].update(results)
        self.timings[stage] = round(seconds, 3)
        self.state["timings"] = self.timings
        if stage in _MODEL_STAGES:
            from .checkpoint import save_model

            save_model(self.model, self.tokenizer, self.output_dir / "checkpoints" / stage)
            self.state["last_model_checkpoint"] = stage
        write_json_atomic(self.output_dir / STATE_FILE, self.state)

    # -- the pipeline ------------------------------------------------------------------------

    def execute(self) -> tuple[Any, Any, dict[str, Any]]:
        load_plugins()
        self._check_strategies()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.output_dir / CONFIG_FILE, self.requested.to_dict())
        tracker = ProgressTracker(self.output_dir)
        pm.register(tracker)
        try:
            return self._stages()
        finally:
            pm.unregister(tracker)
            tracker.close()

    def _check_strategies(self) -> None:
        c = self.config
        hooks.check_strategy("score_heads", c.scorer)
        hooks.check_strategy("prune", c.prune_strategy)
        hooks.check_strategy("fine_tune", c.fine_tune)
        if c.growth_strategy:
            hooks.check_strategy("grow_heads", c.growth_strategy)

    def _stages(self) -> tuple[Any, Any, dict[str, Any]]:
        import transformers

        c = self.config
        if c.quiet:
            quiet_libraries()
        transformers.set_seed(c.seed)
        self.device = resolve_device(c.device)
        self._load()
        c = self.config  # _load may have filled in the demo model's settings
        results = self.state["results"]

        if not self._done("baseline"):
            start = time.perf_counter()
            baseline = self._evaluate("baseline")
            sample = self._sample("baseline")
            self._finish("baseline", time.perf_counter() - start, baseline=baseline, sample_before=sample,
                         parameters_before=self._parameters(), heads_original=self._head_counts())

        if not self._done("score"):
            start = time.perf_counter()
            scores = hooks.score_heads(c.scorer, model=self.model, batches=self._calibration_batches(), config=c)
            emit("score", strategy=c.scorer, scores=scores.scores, tokens_seen=scores.tokens_seen,
                 seconds=scores.seconds)
            self._finish("score", time.perf_counter() - start, scores=scores.to_dict())

        if not self._done("prune"):
            start = time.perf_counter()
            scores = _scores_from_dict(results["scores"])
            pruned = hooks.prune(c.prune_strategy, model=self.model, scores=scores, config=c)
            self.model.to(self.device)
            emit("prune", heads_removed=pruned.count, mode=pruned.mode, heads_alive=self._heads_alive())
            after = self._evaluate("pruned")
            self._finish("prune", time.perf_counter() - start, pruned=after,
                         removed={str(k): v for k, v in pruned.heads.items()}, prune_mode=pruned.mode)

        if not self._done("fine_tune"):
            start = time.perf_counter()
            tuned = hooks.fine_tune(c.fine_tune, model=self.model, tokenizer=self.tokenizer, data=self.data,
                                    config=c, stage="fine_tune")
            self._finish("fine_tune", time.perf_counter() - start, fine_tune={"steps": tuned.steps,
                                                                              "best_eval_loss": tuned.best_eval_loss})

        if c.growth_strategy and c.growth_percent > 0:
            if not self._done("grow"):
                start = time.perf_counter()
                grown = hooks.grow_heads(c.growth_strategy, model=self.model, data=self.data, config=c)
                self.model.to(self.device)
                emit("grow", heads_grown=grown.count, heads_alive=self._heads_alive())
                self._finish("grow", time.perf_counter() - start,
                             grown={str(k): v for k, v in grown.heads.items()})
            if not self._done("fine_tune_growth"):
                start = time.perf_counter()
                tuned = hooks.fine_tune(c.fine_tune, model=self.model, tokenizer=self.tokenizer, data=self.data,
                                        config=c, stage="fine_tune_growth")
                self._finish("fine_tune_growth", time.perf_counter() - start,
                             fine_tune_growth={"steps": tuned.steps, "best_eval_loss": tuned.best_eval_loss})

        if not self._done("final"):
            start = time.perf_counter()
            final = self._evaluate("final")
            sample = self._sample("final")
            self._finish("final", time.perf_counter() - start, final=final, sample_after=sample,
                         parameters_after=self._parameters(), heads_final=self._head_counts())

        summary = self._summary()
        self._save(summary)
        return self.model, self.tokenizer, summary

    # -- stages' parts -----------------------------------------------------------------------

    def _load(self) -> None:
        from .checkpoint import load_model
        from .data import load_data
        from .defaults import demo_run_config, is_demo_model, resolve_model_and_data

        checkpoint = self.state.get("last_model_checkpoint")
        model_source, data_source = resolve_model_and_data(self.config, announce=not checkpoint)
        if is_demo_model(model_source):
            self.config = demo_run_config(self.config)
        c = self.config
        if checkpoint:
            model_source = str(self.output_dir / "checkpoints" / checkpoint)
        self.model, self.tokenizer = load_model(
            model_source, device=self.device, attn_implementation=c.attn_implementation,
            trust_remote_code=c.trust_remote_code,
        )
        self.model.eval()
        self.data = load_data(data_source, self.tokenizer, block_size=c.block_size, seed=c.seed)
        self.state.setdefault("sources", {"model": model_source, "data": data_source})

    def _calibration_batches(self) -> list[dict[str, Any]]:
        from .data import batches

        c = self.config
        out = []
        for batch in batches(self.data.train.blocks, c.batch_size, shuffle=True, seed=c.seed):
            out.append(batch)
            if len(out) >= c.calibration_batches:
                break
        return out

    def _eval_ids(self):
        ids = self.data.validation.ids
        if self.config.max_eval_blocks:
            ids = ids[: self.config.max_eval_blocks * self.config.block_size]
        return ids

    def _evaluate(self, stage: str) -> dict[str, float]:
        from .evaluation import evaluate

        c = self.config
        result = evaluate(self.model, self._eval_ids(), block_size=c.block_size, stride=c.eval_stride,
                          batch_size=c.batch_size, device=self.device, progress=not c.quiet)
        values = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
                  "tokens_per_second": result.tokens_per_second}
        emit("evaluate", label=stage, heads_alive=self._heads_alive(), **values)
        return values

    def _sample(self, stage: str) -> str:
        from .generation import generate_text

        prompt = str(self.config.options.get("sample_prompt", SAMPLE_PROMPT))
        text = generate_text(self.model, self.tokenizer, prompt, max_new_tokens=20 if self.config.test_mode else 60,
                             seed=self.config.seed)
        emit("sample", label=stage, prompt=prompt, text=text)
        return text

    def _heads_alive(self) -> list[int]:
        from .surgery import get_head_map

        head_map = get_head_map(self.model)
        return [len(head_map.active(layer)) for layer in range(head_map.num_layers)]

    def _head_counts(self) -> dict[str, Any]:
        from .surgery import get_head_map

        head_map = get_head_map(self.model)
        alive = self._heads_alive()
        return {"per_layer": alive, "total": sum(alive),
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
            "heads": {"original": original, "removed": removed, "grown": grown, "final": final,
                      "per_layer_final": r["heads_final"]["per_layer"], "removed_heads": r.get("removed", {}),
                      "grown_heads": r.get("grown", {}), "prune_mode": r.get("prune_mode")},
            "parameters": {"before": r["parameters_before"], "after": r["parameters_after"]},
            "speed": {"tokens_per_second_before": before["tokens_per_second"],
                      "tokens_per_second_after": after["tokens_per_second"],
                      "ratio": after["tokens_per_second"] / before["tokens_per_second"]
                      if before["tokens_per_second"] else None},
            "fine_tune": r.get("fine_tune"),
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
        from .checkpoint import save_model

        save_model(self.model, self.tokenizer, self.output_dir / "model")
        export_error = self._export(summary)
        write_json_atomic(self.output_dir / SUMMARY_FILE, summary)
        try:
            from .plots import plot_run
        except ImportError:  # matplotlib is a dependency; this guards a broken backend only
            plot_run = None
        if plot_run is not None:
            plot_run(self.output_dir)
        self.state["finished"] = True
        write_json_atomic(self.output_dir / STATE_FILE, self.state)
        if export_error:
            raise SentinelError(f"the run finished and its model is in {self.output_dir / 'model'}, but the "
                                f"{self.config.export} export failed: {export_error}")

    def _export(self, summary: dict[str, Any]) -> str | None:
        """``--export``: a stock checkpoint in ``export/``, recorded in the summary; the error, if any.

        A model the format cannot express does not cost the run: the summary records the error,
        the run is marked finished, and the error is raised after that.
        """
        if not self.config.export:
            return None
        from .export import EXPORT_DIR, export_model

        try:
            report = export_model(self.model, self.tokenizer, self.output_dir / EXPORT_DIR, format=self.config.export,
                                  quiet=self.config.quiet)
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
