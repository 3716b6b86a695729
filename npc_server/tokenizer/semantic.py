"""Semantic stream: 40 ms (25 Hz) encoder + 4096-code VQ, trained to reconstruct log-mel, log-F0 and energy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from npc_server.tokenizer.modules import ConvReadout, EncoderConfig, ReconDecoder, StreamingEncoder
from npc_server.tokenizer.quantizers import FSQConfig, QuantizedStreamConfig, VQConfig, make_quantizer


def _sem_encoder() -> EncoderConfig:
    return EncoderConfig(strides=[1, 2, 2], kernels=[3, 4, 4], channels=160, dim=128, layers=2, heads=4, chunk=24, out_dim=4)


@dataclass
class SemanticConfig(QuantizedStreamConfig):
    encoder: EncoderConfig = field(default_factory=_sem_encoder)
    quantizer: str = "fsq"  # "fsq" (finite scalar, levels below) or "vq" (EMA codebook)
    fsq: FSQConfig = field(default_factory=lambda: FSQConfig(levels=[8, 8, 8, 8]))
    vq: VQConfig = field(default_factory=lambda: VQConfig(codebook_size=4096, dim=64))
    n_phones: int = 64
    decoder_hidden: int = 192
    decoder_layers: int = 3
    readout_hidden: int = 128
    readout_layers: int = 2
    ctc_upsample: int = 2

    @property
    def n_targets(self) -> int:
        """Reconstruction targets per 10 ms frame: log-mel bins + log-F0 + voicing logit + log energy."""
        return self.encoder.n_mels + 3



class SemanticTokenizer(nn.Module):
    """log-mel -> 25 Hz vectors -> codes 0..4095; a decoder reconstructs 10 ms frames (mel, F0, voicing, energy)."""

    def __init__(self, cfg: SemanticConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = StreamingEncoder(cfg.encoder)
        self.vq = make_quantizer(cfg.quantizer, cfg.vq, cfg.fsq)
        self.decoder = ReconDecoder(cfg.q_dim, cfg.decoder_hidden, cfg.n_targets, cfg.encoder.stride, cfg.decoder_layers)
        self.readout = ConvReadout(cfg.q_dim, cfg.readout_hidden, cfg.n_phones + 1, cfg.ctc_upsample, cfg.readout_layers)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None, state=None):
        z, state = self.encoder(mel, state, mask)
        zq, codes, vq_loss = self.vq(z, mask)
        return {"zq": zq, "codes": codes, "vq_loss": vq_loss}, state

    def encode(self, mel: torch.Tensor, state=None):
        z, state = self.encoder(mel, state)
        return self.vq.encode(z), state

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, n_targets, T * 4]: normalised log-mel, log2(F0/150), voicing logit, log energy."""
        return self.decoder(self.vq.embed(codes))
