"""Random-init presets: the GPT-2 architectures with seeded random weights.

Same preset and seed -> bit-identical weights (torch's CPU generator), so `verify` can rebuild the
reference model later from the manifest alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VOCAB_SIZE = 50257
EOS_TOKEN_ID = 50256


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int = 1024
    # std of the normal init. GPT-2's 0.02 gives near-flat logits on a tiny model, whose greedy
    # output is then one token repeated; the tiny preset spreads its weights wider.
    initializer_range: float = 0.02


PRESETS: dict[str, Preset] = {
    "tiny": Preset(n_layer=2, n_head=4, n_embd=64, n_positions=256, initializer_range=0.3),
    "distilgpt2": Preset(n_layer=6, n_head=12, n_embd=768),
    "gpt2": Preset(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": Preset(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": Preset(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": Preset(n_layer=48, n_head=25, n_embd=1600),
}


def preset_config_kwargs(name: str) -> dict[str, Any]:
    """GPT2Config keyword arguments of a preset; ValueError listing the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        )
    p = PRESETS[name]
    return dict(
        n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, n_positions=p.n_positions,
        n_ctx=p.n_positions, vocab_size=VOCAB_SIZE, bos_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID, initializer_range=p.initializer_range,
    )


def parameter_count(n_layer: int, n_embd: int, n_positions: int, vocab: int = VOCAB_SIZE) -> int:
    """Parameters of a GPT-2 shape (wte counted once: lm_head is tied)."""
    per_layer = 12 * n_embd * n_embd + 13 * n_embd
    return vocab * n_embd + n_positions * n_embd + n_layer * per_layer + 2 * n_embd


def build_random_model(name: str, seed: int) -> Any:
    """A GPT2LMHeadModel of preset `name` with weights drawn from torch's generator at `seed`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**preset_config_kwargs(name))
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    return model.eval()
