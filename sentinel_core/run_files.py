"""The names of the files in a run folder, in one place (see docs/architecture.md)."""

RUN_CONFIG_FILE = "experiment.json"  # the config the run was started with
RUN_STATE_FILE = "state.json"  # finished stages and their results, rewritten after each stage
RUN_SUMMARY_FILE = "summary.json"  # written once the run has finished
METRICS_FILE = "metrics.jsonl"  # every metric event, one JSON object per line
FINAL_MODEL_DIR = "model"  # the final model
STAGE_CHECKPOINTS_DIR = "checkpoints"  # checkpoints/<stage>: the model after each model-changing stage
