"""``sentinel generate``: text from a model; interactive and streamed when no prompt is given."""

from __future__ import annotations

import click

from . import cli
from .options import (
    device_map_option,
    device_option,
    dtype_option,
    load_checked,
    model_option,
    seed_option,
    trust_option,
)


@cli.command("generate")
@model_option
@click.argument("prompt", nargs=-1)
@click.option("--max-new-tokens", type=int, default=50, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=50, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--greedy", is_flag=True, help="Pick the most likely token each step instead of sampling.")
@seed_option
@device_option
@dtype_option
@device_map_option
@trust_option
def generate_command(model: str, prompt: tuple[str, ...], max_new_tokens: int, temperature: float, top_k: int,
                     top_p: float, greedy: bool, seed: int, device: str, dtype: str, device_map: str | None, trust_remote_code: bool) -> None:
    """Continue PROMPT; with no PROMPT, read prompts interactively and stream the answers."""
    from ..config import resolve_device
    from ..generation import generate_text, stream_text

    device = resolve_device(device)
    loaded, tokenizer = load_checked(model, device=device, trust_remote_code=trust_remote_code, dtype=dtype,
                                     device_map=device_map)
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, do_sample=not greedy)
    if prompt:
        text = " ".join(prompt)
        click.echo(text + generate_text(loaded, tokenizer, text, **settings))
        return
    click.echo("Type a prompt and press Enter; an empty line or Ctrl-D quits.", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        click.echo(line, nl=False)
        for piece in stream_text(loaded, tokenizer, line, **settings):
            click.echo(piece, nl=False)
        click.echo()
