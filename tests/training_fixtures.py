"""Tiny models and token data for the training-loop tests (and the distributed test script).

The data is a learnable toy language: every block is an arithmetic progression modulo the
vocabulary, ``start, start + d, start + 2d, ...`` with ``d`` drawn from a few values, so a
model that sees two tokens can predict the rest and the loss really falls when training works.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sentinel_core.data import LMData, TokenSplit

VOCAB = 64
BLOCK = 16


def progression_blocks(n: int, *, seed: int, vocab: int = VOCAB, block: int = BLOCK) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=generator)
    steps = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (n, 1), generator=generator)]
    return (starts + steps * torch.arange(block)) % vocab


def random_blocks(n: int, *, seed: int, vocab: int = VOCAB, block: int = BLOCK) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, block), generator=generator)


def split(blocks: torch.Tensor) -> TokenSplit:
    blocks = blocks.contiguous()
    return TokenSplit(ids=blocks.reshape(-1), blocks=blocks)


def make_data(n_train: int = 64, n_val: int = 8, *, learnable: bool = True, seed: int = 0) -> LMData:
    maker = progression_blocks if learnable else random_blocks
    return LMData(train=split(maker(n_train, seed=seed)), validation=split(maker(n_val, seed=seed + 1000)),
                  test=None, block_size=BLOCK, source="toy", validation_from_train=False)


def make_model(*, seed: int = 0, dropout: float = 0.0, n_layer: int = 2, n_head: int = 4,
               n_embd: int = 32) -> GPT2LMHeadModel:
    """A seeded tiny GPT-2 (vocab 64, 16 positions); ``dropout`` applies to every dropout layer."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=VOCAB, n_positions=BLOCK,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key].detach().cpu(), b[key].detach().cpu()
        if x.shape != y.shape:
            return False
        if atol == 0.0:
            if not torch.equal(x, y):
                return False
        elif not torch.allclose(x.float(), y.float(), atol=atol, rtol=0):
            return False
    return True
