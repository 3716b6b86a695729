"""Tiny untrained models and short-answer personas: they run every code path of serving in milliseconds.

Used by the tests and by the transport benchmarks (`--tiny`). Untrained weights say nothing about the quality of
answers; they exist to exercise tokenize -> prefill with a KV cache -> constrained text/audio blocks -> streaming
vocoder, the gRPC server and the engine bridges.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from npc_server.paths import DEFAULT_PERSONAS_DIR


def build_tiny_model(directory: str | Path) -> Path:
    """Save a tiny, randomly initialised tokenizer + backbone + vocoder in the layout of models/default."""
    from npc_server.backbone.model import build_model, preset as backbone_preset, save_backbone
    from npc_server.backbone.text_tokenizer import TextTokenizer
    from npc_server.tokenizer import AudioTokenizer, preset as tokenizer_preset
    from npc_server.vocoder import FlowConfig, FlowDecoder, Generator, GeneratorConfig, Vocoder

    directory = Path(directory)
    torch.manual_seed(0)
    tok = AudioTokenizer(tokenizer_preset("tiny", phones=list("abdefhiklmnoprstuvwz"))).eval()
    tok.save_pretrained(directory / "tokenizer")

    texts = ["Welcome to The Sleepy Otter, traveller!", "A room costs ten gold.", "The smithy is by the river."] * 20
    text_tok = TextTokenizer.train(texts, vocab_size=300, min_frequency=1)
    cfg = backbone_preset("tiny", text_tok.vocab_size)
    save_backbone(build_model(cfg), cfg, directory / "backbone")
    text_tok.save(directory / "backbone")

    flow = FlowDecoder(FlowConfig(dim=32, token_dim=32, n_heads=2, transformer_layers=1, res_blocks=1,
                                  cond_layers=1, attn_window=8, n_steps=2))
    gen = Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2))
    with torch.no_grad():  # zero-initialised output layers would make silence; give them small weights
        for p in [*flow.parameters(), *gen.parameters()]:
            if p.dim() > 0 and torch.all(p == 0):
                p.normal_(0, 0.05)
    Vocoder(flow, gen).eval().save_pretrained(directory / "vocoder")
    return directory


def capped_personas(folder: str | Path, seconds: int = 1, long_npc: str | None = None, long_seconds: int = 8) -> Path:
    """Copy the shipped personas into `folder` with answers capped at `seconds` (an untrained model babbles until
    its length limit), except `long_npc`, capped at `long_seconds`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in DEFAULT_PERSONAS_DIR.glob("*.yaml"):
        text = f.read_text()
        cap = long_seconds if long_npc and f"id: {long_npc}" in text else seconds
        (folder / f.name).write_text(re.sub(r"max_answer_seconds: \d+", f"max_answer_seconds: {cap}", text))
    return folder
