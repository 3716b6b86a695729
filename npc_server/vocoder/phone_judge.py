"""Mel phone judge: a small convolutional CTC phone recogniser on the vocoder's log-mel, used as a training-time
intelligibility loss for the flow (and as a cheap listener for its output); it is not on the serving path."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class PhoneJudgeConfig:
    phones: list[str] = field(default_factory=list)  # CTC phone inventory (ids 1..n; 0 = blank), the tokenizer's
    n_mels: int = 80
    dim: int = 256
    layers: int = 5  # conv layers after the stride-2 input layer; receptive field ~ +-(2 + 4 * layers) mel frames
    kernel_size: int = 5
    mel_mean: float = -5.0
    mel_std: float = 2.5

    def to_dict(self) -> dict:
        return asdict(self)


class PhoneJudge(nn.Module):
    """Raw log-mel [B, n_mels, F] (100 Hz) -> CTC phone logits [B, F // 2, n_phones + 1] (50 Hz).

    Convolutions only, with no normalisation across time, so a segment is judged the same wherever it is cut from."""

    def __init__(self, config: PhoneJudgeConfig):
        super().__init__()
        self.config = c = config
        self.inp = nn.Conv1d(c.n_mels, c.dim, 4, stride=2, padding=1)
        self.convs = nn.ModuleList(nn.Conv1d(c.dim, c.dim, c.kernel_size, padding=c.kernel_size // 2)
                                   for _ in range(c.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(c.dim) for _ in range(c.layers))
        self.out = nn.Linear(c.dim, len(c.phones) + 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = F.silu(self.inp((mel - c.mel_mean) / c.mel_std))
        for conv, norm in zip(self.convs, self.norms):
            h = h + F.silu(norm(conv(h).transpose(1, 2)).transpose(1, 2))
        return self.out(h.transpose(1, 2))

    @staticmethod
    def out_lengths(mel_frames: torch.Tensor) -> torch.Tensor:
        return mel_frames // 2

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()},
                  str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PhoneJudge":
        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: no phone judge here (config.json missing); train one with "
                                    "`npc-server train vocoder --stage judge`")
        model = cls(PhoneJudgeConfig(**json.loads((d / "config.json").read_text())))
        model.load_state_dict({k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()})
        return model.eval()
