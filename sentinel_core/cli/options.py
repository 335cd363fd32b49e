"""Options shared by several subcommands, so they read and behave the same everywhere."""

from __future__ import annotations

import click

model_option = click.option("--model", "model", required=True,
                            help="Hub name, local model directory (a Sentinel run's model/ too), 'demo' or "
                                 "'demo-llama'.")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
trust_option = click.option("--trust-remote-code", is_flag=True,
                            help="Allow the model's own Python code from the Hub to run (off by default).")
seed_option = click.option("--seed", type=int, default=42, show_default=True,
                           help="Random seed (also picks the validation split of a single-file dataset).")


def resolve_model(model: str) -> str:
    """``demo`` and ``demo-llama`` name the embedded demo models; anything else is passed to ``load_model``."""
    from ..defaults import is_demo_name

    if is_demo_name(model):
        from ..demo import demo_spec_for, ensure_demo_model

        return str(ensure_demo_model(spec=demo_spec_for(model)))
    return model
