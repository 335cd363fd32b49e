"""Options shared by several subcommands, so they read and behave the same everywhere."""

from __future__ import annotations

import click

model_option = click.option("--model", "model", required=True,
                            help="Hub name, local model directory (a Sentinel run's model/ too), 'demo' or "
                                 "'demo-llama'.")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
trust_option = click.option("--trust-remote-code", is_flag=True,
                            help="Allow the model's own Python code from the Hub to run (off by default).")
option_assignments = click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
                                  help="A strategy option (repeatable; see `sentinel run --help-strategy NAME`).")
seed_option = click.option("--seed", type=int, default=42, show_default=True,
                           help="Random seed (also picks the validation split of a single-file dataset).")


dtype_option = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                            show_default=True, help="Load the model in this dtype (auto: as the checkpoint stores it).")
device_map_option = click.option("--device-map", type=click.Choice(["auto", "balanced", "sequential"]), default=None,
                                 help="Spread the model's layers over the GPUs (and the CPU) with Accelerate, for "
                                      "models larger than one device; overrides --device.")


def load_checked(model: str, *, device: str, trust_remote_code: bool, block_size: int | None = None,
                 attn_implementation: str | None = None, dtype: str = "auto", device_map: str | None = None):
    """Load ``model`` (``demo`` included) for a command, with the checks every command makes
    first (finite weights, a tokenizer, ``block_size`` within the model's positions)."""
    from ..defaults import resolve_model
    from ..model_io import check_model_inputs, load_model

    loaded, tokenizer = load_model(resolve_model(model), device=device, trust_remote_code=trust_remote_code,
                                   attn_implementation=attn_implementation, dtype=dtype, device_map=device_map)
    check_model_inputs(loaded, tokenizer, model, block_size)
    return loaded, tokenizer


