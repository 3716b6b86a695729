"""Linguistic stream: 60 ms (16.7 Hz) encoder + 1024-code VQ, with the CTC phone readout used in training and eval."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from npc_server.tokenizer.modules import ConvReadout, EncoderConfig, StreamingEncoder
from npc_server.tokenizer.quantizers import FSQConfig, QuantizedStreamConfig, VQConfig, make_quantizer


def _ling_encoder() -> EncoderConfig:
    return EncoderConfig(strides=[1, 2, 3], kernels=[3, 4, 5], channels=160, dim=128, layers=3, heads=4, chunk=16, out_dim=5)


@dataclass
class LinguisticConfig(QuantizedStreamConfig):
    encoder: EncoderConfig = field(default_factory=_ling_encoder)
    quantizer: str = "fsq"  # "fsq" (finite scalar, levels below) or "vq" (EMA codebook)
    fsq: FSQConfig = field(default_factory=lambda: FSQConfig(levels=[4, 4, 4, 4, 4]))
    vq: VQConfig = field(default_factory=lambda: VQConfig(codebook_size=1024, dim=64))
    n_phones: int = 64  # phone inventory size (CTC blank is an extra class 0)
    readout_hidden: int = 192
    readout_layers: int = 3
    readout_rnn_layers: int = 0  # bidirectional GRU layers on top of the conv readout (0 = conv only)
    ctc_upsample: int = 3  # CTC outputs per 60 ms token (phones can be faster than 16.7 Hz)


class LinguisticTokenizer(nn.Module):
    """log-mel -> 16.7 Hz vectors -> codes 0..1023; the readout maps quantised codes to CTC phone logits."""

    def __init__(self, cfg: LinguisticConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = StreamingEncoder(cfg.encoder)
        self.vq = make_quantizer(cfg.quantizer, cfg.vq, cfg.fsq)
        self.readout = ConvReadout(cfg.q_dim, cfg.readout_hidden, cfg.n_phones + 1, cfg.ctc_upsample, cfg.readout_layers,
                                    rnn_layers=cfg.readout_rnn_layers)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None, state=None):
        """mel [B, n_mels, T] -> dict(z (unit, continuous), zq (straight-through), codes, vq_loss), new state."""
        z, state = self.encoder(mel, state, mask)
        zq, codes, vq_loss = self.vq(z, mask)
        return {"z": self.vq.soft(z), "zq": zq, "codes": codes, "vq_loss": vq_loss}, state

    def encode(self, mel: torch.Tensor, state=None):
        z, state = self.encoder(mel, state)
        return self.vq.encode(z), state

    def phone_logits(self, codes: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, T] -> CTC logits [B, T * ctc_upsample, n_phones + 1] (blank = 0)."""
        return self.readout(self.vq.embed(codes), lengths)
