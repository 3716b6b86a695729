"""The dual-codebook AudioTokenizer: 16.7 Hz linguistic + 25 Hz semantic codes, 2:3 interleave, streaming encode.

Audio vocabulary (what the backbone reads and writes, `AUDIO_VOCAB_SIZE` = 5120 ids):

    id 0    .. 1023  linguistic code k  (60 ms, 16.7 Hz)        -> id = k
    id 1024 .. 5119  semantic code k    (40 ms, 25 Hz)          -> id = 1024 + k

Interleaved order, one group per 120 ms: [L, L, S, S, S] (2 linguistic + 3 semantic, 41.7 ids/s). The backbone
places audio id a at text_vocab_size + a (the equivalent of Step-Audio's 65536 + a).

Timing: audio is resampled to 16 kHz and cut into 120 ms groups (1920 samples); an utterance of n samples gives
ceil(n / 1920) groups, the last one zero-padded. Encoding runs block by block (`block_groups` groups, 960 ms
by default): every layer is causal across blocks and attends inside its own block, so `stream()` fed with any
chunking produces exactly the codes of `encode()` (which is the same stream fed at once).
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soxr
import torch
import torch.nn as nn

from npc_server.audio.io import AudioError, to_mono, validate_audio
from npc_server.tokenizer.features import FeatureConfig, LogMel
from npc_server.tokenizer.linguistic import LinguisticConfig, LinguisticTokenizer
from npc_server.tokenizer.modules import EncoderConfig
from npc_server.tokenizer.phones import PhoneInventory
from npc_server.tokenizer.semantic import SemanticConfig, SemanticTokenizer

LINGUISTIC_CODES = 1024
SEMANTIC_CODES = 4096
LINGUISTIC_OFFSET = 0
SEMANTIC_OFFSET = LINGUISTIC_CODES
AUDIO_VOCAB_SIZE = LINGUISTIC_CODES + SEMANTIC_CODES
GROUP_LINGUISTIC = 2
GROUP_SEMANTIC = 3
GROUP_SIZE = GROUP_LINGUISTIC + GROUP_SEMANTIC
GROUP_SECONDS = 0.12


class AudioTokens(NamedTuple):
    linguistic: torch.Tensor  # LongTensor [T_l], codes 0..1023, 16.7 Hz
    semantic: torch.Tensor  # LongTensor [T_s], codes 0..4095, 25 Hz
    interleaved: torch.Tensor  # LongTensor [T_l + T_s], audio-vocabulary ids, groups [L L S S S]

    @property
    def n_groups(self) -> int:
        return self.linguistic.shape[0] // GROUP_LINGUISTIC

    @property
    def seconds(self) -> float:
        return self.n_groups * GROUP_SECONDS


def interleave(linguistic, semantic) -> torch.Tensor:
    """(ling [2g], sem [3g]) codes -> ids [5g] in groups [L, L, 1024+S, 1024+S, 1024+S]."""
    ling = torch.as_tensor(linguistic, dtype=torch.long).reshape(-1)
    sem = torch.as_tensor(semantic, dtype=torch.long).reshape(-1)
    if ling.numel() % GROUP_LINGUISTIC or sem.numel() % GROUP_SEMANTIC:
        raise ValueError(f"need 2 linguistic per 3 semantic codes, got {ling.numel()} and {sem.numel()}")
    g = ling.numel() // GROUP_LINGUISTIC
    if sem.numel() // GROUP_SEMANTIC != g:
        raise ValueError(f"{ling.numel()} linguistic codes need {GROUP_SEMANTIC * g} semantic codes, got {sem.numel()}")
    if ling.numel() and (ling.min() < 0 or ling.max() >= LINGUISTIC_CODES):
        raise ValueError("linguistic codes must be in 0..1023")
    if sem.numel() and (sem.min() < 0 or sem.max() >= SEMANTIC_CODES):
        raise ValueError("semantic codes must be in 0..4095")
    return torch.cat([ling.view(g, GROUP_LINGUISTIC), sem.view(g, GROUP_SEMANTIC) + SEMANTIC_OFFSET], dim=1).reshape(-1)


def split_interleaved(ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved audio ids [5g] -> (linguistic codes [2g], semantic codes [3g]); checks the group layout."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() % GROUP_SIZE:
        raise ValueError(f"interleaved audio ids come in groups of {GROUP_SIZE}, got {ids.numel()} ids")
    groups = ids.view(-1, GROUP_SIZE)
    ling, sem = groups[:, :GROUP_LINGUISTIC], groups[:, GROUP_LINGUISTIC:]
    if ling.numel() and (ling.min() < 0 or ling.max() >= LINGUISTIC_CODES):
        raise ValueError("positions 0-1 of each group must be linguistic ids 0..1023")
    if sem.numel() and (sem.min() < SEMANTIC_OFFSET or sem.max() >= AUDIO_VOCAB_SIZE):
        raise ValueError("positions 2-4 of each group must be semantic ids 1024..5119")
    return ling.reshape(-1).clone(), (sem - SEMANTIC_OFFSET).reshape(-1).clone()


def make_tokens(ling: torch.Tensor, sem: torch.Tensor) -> AudioTokens:
    ling = ling.reshape(-1).long()
    sem = sem.reshape(-1).long()
    return AudioTokens(ling, sem, interleave(ling, sem))


class BlockTiming:
    """Shared by the tokenizer configs (dataclasses with `features` and `block_groups`): 120 ms groups, encoding
    blocks, and the config.json round trip."""

    @property
    def group_samples(self) -> int:
        return int(round(GROUP_SECONDS * self.features.sample_rate))

    @property
    def block_samples(self) -> int:
        return self.block_groups * self.group_samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return _from_dict(cls, d)


@dataclass
class AudioTokenizerConfig(BlockTiming):
    features: FeatureConfig = field(default_factory=FeatureConfig)
    linguistic: LinguisticConfig = field(default_factory=LinguisticConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    phones: list[str] = field(default_factory=list)  # CTC phone inventory (ids 1..n; 0 = blank)
    block_groups: int = 8  # 120 ms groups per encoding block (also the attention chunk): 960 ms
    max_seconds: float = 120.0

    def __post_init__(self) -> None:
        n = max(1, len(self.phones))
        self.linguistic.n_phones = n
        self.semantic.n_phones = n
        self.linguistic.encoder.chunk = self.block_groups * GROUP_LINGUISTIC
        self.semantic.encoder.chunk = self.block_groups * GROUP_SEMANTIC
        hop_ms = 1000 * self.features.hop_length / self.features.sample_rate
        if abs(self.linguistic.encoder.stride * hop_ms - 60) > 1e-6 or abs(self.semantic.encoder.stride * hop_ms - 40) > 1e-6:
            raise ValueError("linguistic tokens must be 60 ms and semantic tokens 40 ms")
        if self.linguistic.codebook_size != LINGUISTIC_CODES or self.semantic.codebook_size != SEMANTIC_CODES:
            raise ValueError(f"codebooks must have {LINGUISTIC_CODES} linguistic and {SEMANTIC_CODES} semantic codes")


def _from_dict(cls, d):
    """Nested dict (from config.json) -> nested config dataclasses."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints[f.name]
        if is_dataclass(t) and isinstance(v, dict):
            v = _from_dict(t, v)
        kwargs[f.name] = v
    return cls(**kwargs)


def save_weights(state: dict[str, torch.Tensor], config: dict, directory: str | Path, dtype: torch.dtype) -> None:
    """A tokenizer checkpoint: model.safetensors (floating tensors in `dtype`, but codebooks and the log-mel
    statistics kept fp32) + config.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point() and not name.endswith(("codebook", "mel.mean", "mel.std")):
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def preset(name: str, phones: list[str] | None = None) -> AudioTokenizerConfig:
    """Named sizes: `default` (~4M parameters) and `tiny` (for tests)."""
    phones = list(phones or [])
    if name == "default":
        return AudioTokenizerConfig(phones=phones)
    if name == "tiny":
        ling = LinguisticConfig(
            encoder=EncoderConfig(strides=[1, 2, 3], kernels=[3, 4, 5], channels=64, dim=64, layers=1, heads=2, out_dim=16),
            readout_hidden=64,
            readout_layers=2,
        )
        sem = SemanticConfig(
            encoder=EncoderConfig(strides=[1, 2, 2], kernels=[3, 4, 4], channels=64, dim=64, layers=1, heads=2, out_dim=16),
            decoder_hidden=64,
            decoder_layers=1,
            readout_hidden=64,
            readout_layers=1,
        )
        return AudioTokenizerConfig(linguistic=ling, semantic=sem, phones=phones)
    raise ValueError(f"unknown tokenizer preset {name!r} (use 'default' or 'tiny')")


class AudioTokenizer(nn.Module):
    """Both encoders and their quantisers (+ the training-time readouts/decoder, kept for evaluation)."""

    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = LogMel(cfg.features)
        self.linguistic = LinguisticTokenizer(cfg.linguistic)
        self.semantic = SemanticTokenizer(cfg.semantic)
        self.inventory = PhoneInventory(cfg.phones)

    # ---------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Write model.safetensors (floating weights in `dtype`; codebooks kept fp32) + config.json."""
        state = {k: v for k, v in self.state_dict().items() if not k.endswith(("ema_count", "ema_sum"))}
        save_weights(state, self.cfg.to_dict(), directory, dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> AudioTokenizer:
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, weights = directory / "config.json", directory / "model.safetensors"
        if not cfg_path.exists() or not weights.exists():
            raise FileNotFoundError(f"{directory} must hold config.json and model.safetensors")
        model = cls(AudioTokenizerConfig.from_dict(json.loads(cfg_path.read_text())))
        state = load_file(str(weights), device=device)
        own = model.state_dict()
        state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
        model.load_state_dict(state, strict=False)
        missing = set(own) - set(state)
        if missing - {k for k in own if k.endswith(("ema_count", "ema_sum"))}:
            raise ValueError(f"checkpoint {weights} lacks {sorted(missing)[:5]}")
        return model.to(device).eval()

    # ---------------------------------------------------------------- encoding
    def stream(self, sr: int = 16000) -> TokenizerStream:
        """A streaming encoder for audio arriving in chunks at sample rate `sr`."""
        return TokenizerStream(self, sr)

    @torch.inference_mode()
    def encode(self, wav: np.ndarray | torch.Tensor, sr: int) -> AudioTokens:
        """Mono or stereo audio (samples[, channels]) at any rate 8-192 kHz -> AudioTokens."""
        wav = _as_float_audio(wav)
        validate_audio(wav, sr, self.cfg.max_seconds)
        s = self.stream(sr)
        first = s.push(wav)
        last = s.flush()
        return make_tokens(torch.cat([first.linguistic, last.linguistic]), torch.cat([first.semantic, last.semantic]))

    def final_block_samples(self, n: int) -> int:
        """The length a last, partial block of n samples is zero-padded to: a whole block."""
        return self.cfg.block_samples

    def init_state(self, batch: int = 1):
        return {"past": torch.zeros(batch, self.cfg.features.context), "ling": None, "sem": None}

    @torch.inference_mode()
    def encode_block(self, block: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One block of 16 kHz audio [B, block_samples] -> (ling codes [B, 2*block_groups], sem [B, 3*...], state)."""
        mel = self.mel(block, state["past"])
        ling, ls = self.linguistic.encode(mel, state["ling"])
        sem, ss = self.semantic.encode(mel, state["sem"])
        ctx = self.cfg.features.context
        return ling, sem, {"past": block[:, block.shape[1] - ctx :], "ling": ls, "sem": ss}

    def forward(self, wav: torch.Tensor, n_samples: torch.Tensor | None = None):
        """Training/eval pass over a padded batch of 16 kHz audio [B, n] (n a multiple of block_samples).

        Returns a dict: mel_raw, mel, lengths in groups, linguistic {z, zq, codes, vq_loss},
        semantic {zq, codes, vq_loss}, masks per stream. Same maths as the block-by-block stream.
        """
        b, n = wav.shape
        if n % self.cfg.block_samples:
            raise ValueError(f"pad audio to a multiple of {self.cfg.block_samples} samples")
        if n_samples is None:
            n_samples = torch.full((b,), n, dtype=torch.long)
        groups = torch.div(n_samples + self.cfg.group_samples - 1, self.cfg.group_samples, rounding_mode="floor")
        mel_raw = self.mel.raw(wav)
        mel = (mel_raw - self.mel.mean[:, None]) / self.mel.std[:, None]
        t_l, t_s = n // self.cfg.group_samples * GROUP_LINGUISTIC, n // self.cfg.group_samples * GROUP_SEMANTIC
        mask_l = torch.arange(t_l)[None, :] < (groups * GROUP_LINGUISTIC)[:, None]
        mask_s = torch.arange(t_s)[None, :] < (groups * GROUP_SEMANTIC)[:, None]
        ling, _ = self.linguistic(mel, mask_l)
        sem, _ = self.semantic(mel, mask_s)
        return {"mel_raw": mel_raw, "mel": mel, "groups": groups, "mask_l": mask_l, "mask_s": mask_s, "ling": ling, "sem": sem}

    @torch.inference_mode()
    def phones_from_tokens(self, linguistic: torch.Tensor) -> list[str]:
        """CTC readout of linguistic codes -> phone units (greedy)."""
        from npc_server.tokenizer.phones import ctc_greedy

        logits = self.linguistic.phone_logits(linguistic.reshape(1, -1))
        return self.inventory.decode(ctc_greedy(logits.argmax(-1)[0].tolist()))

    def num_parameters(self, encoder_only: bool = False) -> int:
        mods = [self.linguistic.encoder, self.semantic.encoder] if encoder_only else [self]
        return sum(p.numel() for m in mods for p in m.parameters())


def _as_float_audio(wav) -> np.ndarray:
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    wav = np.asarray(wav)
    if wav.dtype == np.int16:
        wav = wav.astype(np.float32) / 32768.0
    elif not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(f"audio samples must be float or int16, got {wav.dtype}")
    if wav.ndim == 2 and wav.shape[0] in (1, 2) and wav.shape[1] > 2:
        wav = wav.T  # (channels, samples) -> (samples, channels)
    return to_mono(wav)


class TokenizerStream:
    """Incremental encoder: push(chunk) returns the tokens of every completed block; flush() ends the utterance.

    The concatenation of all returned tokens equals `AudioTokenizer.encode` of the whole audio, exactly.
    """

    def __init__(self, model: AudioTokenizer, sr: int = 16000):
        if not isinstance(sr, (int, np.integer)) or not (8000 <= sr <= 192000):
            raise AudioError(f"sample rate {sr!r} Hz is not supported (allowed 8000-192000 Hz)")
        self.model = model
        self.sr = int(sr)
        self.target_sr = model.cfg.features.sample_rate
        self._resampler = None if self.sr == self.target_sr else soxr.ResampleStream(self.sr, self.target_sr, 1, dtype="float32", quality="HQ")
        self._buf = np.zeros(0, dtype=np.float32)
        self._state = model.init_state()
        self._seconds_in = 0.0
        self._samples_out = 0  # 16 kHz samples consumed into blocks (incl. the final partial one)
        self._closed = False

    def _empty(self) -> AudioTokens:
        z = torch.zeros(0, dtype=torch.long)
        return AudioTokens(z, z.clone(), z.clone())

    def push(self, chunk) -> AudioTokens:
        if self._closed:
            raise RuntimeError("stream already flushed; start a new one with tokenizer.stream()")
        chunk = _as_float_audio(chunk)
        if chunk.size == 0:
            return self._empty()
        if not np.all(np.isfinite(chunk)):
            raise AudioError("audio contains NaN or infinite samples")
        self._seconds_in += chunk.shape[0] / self.sr
        if self._seconds_in > self.model.cfg.max_seconds:
            raise AudioError(f"audio is longer than the limit of {self.model.cfg.max_seconds:.1f} s")
        if self._resampler is not None:
            chunk = self._resampler.resample_chunk(chunk, last=False)
        self._buf = np.concatenate([self._buf, chunk.astype(np.float32, copy=False)])
        return self._run(final=False)

    def flush(self) -> AudioTokens:
        """Encode what is left (zero-padded to a block) and close the stream."""
        if self._closed:
            raise RuntimeError("stream already flushed")
        if self._resampler is not None:
            self._buf = np.concatenate([self._buf, self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)])
        out = self._run(final=True)
        self._closed = True
        return out

    def _run(self, final: bool) -> AudioTokens:
        cfg = self.model.cfg
        bs, gs = cfg.block_samples, cfg.group_samples
        lings, sems = [], []
        while self._buf.shape[0] >= bs or (final and self._buf.shape[0] > 0):
            n = min(bs, self._buf.shape[0])
            block = np.zeros(bs if n == bs else self.model.final_block_samples(n), dtype=np.float32)
            block[:n] = self._buf[:n]
            self._buf = self._buf[n:]
            ling, sem, self._state = self.model.encode_block(torch.from_numpy(block)[None], self._state)
            g = math.ceil(n / gs)
            lings.append(ling[0, : GROUP_LINGUISTIC * g])
            sems.append(sem[0, : GROUP_SEMANTIC * g])
            self._samples_out += n
        if not lings:
            return self._empty()
        return make_tokens(torch.cat(lings), torch.cat(sems))
