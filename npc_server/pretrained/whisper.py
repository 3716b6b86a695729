"""Whisper CTranslate2 model.bin -> the encoder's weights as safetensors in the cache -> `WhisperEncoder`."""

from __future__ import annotations

import json
from pathlib import Path

from npc_server.pretrained.cache import cached
from npc_server.pretrained.ct2 import read_ct2
from npc_server.tokenizer.whisper import WhisperEncoder, WhisperEncoderConfig


def convert_encoder(model_bin: Path, out: Path) -> list[str]:
    """Write encoder.safetensors (fp16, as shipped) + encoder.json from a Whisper model.bin."""
    from safetensors.torch import save_file

    ct2 = read_ct2(model_bin, prefix="encoder/")
    if not ct2.spec.startswith("Whisper"):
        raise ValueError(f"{model_bin} holds a {ct2.spec}, not a Whisper model")
    enc = WhisperEncoder.from_ct2(ct2.variables)
    save_file({k: v.half().contiguous() for k, v in enc.state_dict().items()}, str(out / "encoder.safetensors"))
    (out / "encoder.json").write_text(json.dumps(enc.cfg.__dict__, indent=2) + "\n")
    return ["encoder.safetensors", "encoder.json"]


def load_encoder(name: str = "whisper-base", progress: bool = True) -> WhisperEncoder:
    from safetensors.torch import load_file

    folder = cached(name, convert_encoder, progress)
    enc = WhisperEncoder(WhisperEncoderConfig(**json.loads((folder / "encoder.json").read_text())))
    enc.load_state_dict({k: v.float() for k, v in load_file(str(folder / "encoder.safetensors")).items()})
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc.eval()
