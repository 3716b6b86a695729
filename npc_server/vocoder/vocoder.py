"""The `Vocoder` API: semantic tokens (+ voice, pitch shift) -> 24 kHz waveform, offline or streamed in chunks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from npc_server.controls import PITCH_RANGE_ST, emotion_pitch
from npc_server.vocoder.flow import OTHER_VOICE, FlowConfig, FlowDecoder, SamplingConditions
from npc_server.vocoder.generator import Generator, GeneratorConfig
from npc_server.vocoder.mel import MelConfig

# Streamed output equals offline output within these tolerances (tests/test_vocoder_model.py; measured by
# `npc-server eval vocoder`):
# - waveform, relative L2 error ||stream - offline|| / ||offline||, when each chunk's window covers the receptive
#   field (context and lookahead wider than the flow and generator see): checked on tiny models;
STREAM_TOLERANCE = 0.05
# - log-mel distance (`logmel_distance_db`, mean |dB| over 80 bands) with the served chunk settings, whose 3-token
#   lookahead is shorter than the receptive field: checked on the shipped model. Waveforms are no measure there: the
#   harmonic source integrates F0 from the start, so a 1% F0 difference in one chunk shifts the phase of all later
#   audio. For scale, the same tokens decoded offline with other flow noise differ by about 1.2 dB.
STREAM_MEL_TOLERANCE_DB = 1.0


@dataclass
class StreamConfig:
    first_chunk_tokens: int = 5  # 200 ms of audio once 5 + lookahead tokens are in
    chunk_tokens: int = 15  # the third chunk: 600 ms
    max_chunk_tokens: int = 0  # chunks after the third (0 = chunk_tokens); longer chunks re-decode less context
    lookahead_tokens: int = 3  # right context a chunk waits for (its audio also seeds the crossfade)
    # right context of the chunks after the second, from tokens already there (0 = off): such a chunk is still due once
    # it has `lookahead_tokens`, and is then shortened (to at least first_chunk_tokens) to keep up to this many as
    # right context. Closer to offline audio at the same latency (first audio, no chunk later, the audio out trails the
    # tokens in by no more at its worst), for 5-11% more streaming compute at 6-8 tokens (docs/vocoder.md)
    buffered_lookahead_tokens: int = 0
    left_context_tokens: int = 12  # already-emitted tokens re-decoded as left context
    crossfade_samples: int = 480  # 20 ms at 24 kHz

    def validate(self, samples_per_token: int) -> None:
        if min(self.first_chunk_tokens, self.chunk_tokens) < 1 or self.lookahead_tokens < 1 or \
                self.max_chunk_tokens < 0 or self.buffered_lookahead_tokens < 0:
            raise ValueError("chunk sizes and lookahead must be at least one token (max_chunk_tokens and "
                             "buffered_lookahead_tokens at least 0)")
        if self.crossfade_samples > self.lookahead_tokens * samples_per_token:
            raise ValueError("crossfade_samples must fit inside the lookahead")


def _from_dict(cls, data: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _as_token_array(semantic_ids, n_codes: int) -> np.ndarray:
    if isinstance(semantic_ids, torch.Tensor):
        semantic_ids = semantic_ids.detach().cpu().numpy()
    arr = np.asarray(list(semantic_ids) if not isinstance(semantic_ids, np.ndarray) else semantic_ids)
    if arr.ndim != 1:
        raise ValueError(f"semantic ids must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise ValueError("semantic ids must be integers")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_codes):
        bad = int(arr[(arr < 0) | (arr >= n_codes)][0])
        raise ValueError(f"semantic id {bad} is out of range 0..{n_codes - 1}")
    return arr


class Vocoder(nn.Module):
    """Flow-matching token->mel decoder + mel->wave generator, with deterministic positional noise so that chunked
    (streaming) decoding reproduces offline decoding."""

    def __init__(
        self,
        flow: FlowDecoder,
        generator: Generator,
        mel_config: MelConfig | None = None,
        stream_config: StreamConfig | None = None,
        seed: int = 1234,
    ):
        super().__init__()
        self.flow, self.generator = flow, generator
        self.mel_config = mel_config or MelConfig()
        self.stream_config = stream_config or StreamConfig()
        self.seed = seed
        self._noise_blocks: dict[int, torch.Tensor] = {}
        if self.generator.config.hop_length != self.mel_config.hop_length:
            raise ValueError("generator hop length must equal the mel hop length")
        self.stream_config.validate(self.samples_per_token)

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.mel_config.sample_rate

    @property
    def samples_per_token(self) -> int:
        return self.flow.config.frames_per_token * self.mel_config.hop_length

    @property
    def voices(self) -> list[str]:
        return [v for v in self.flow.config.voices if v != OTHER_VOICE]

    # -- persistence --------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "mel": self.mel_config.to_dict(),
            "flow": self.flow.config.to_dict(),
            "generator": self.generator.config.to_dict(),
            "stream": asdict(self.stream_config),
            "seed": self.seed,
        }

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(self.config_dict(), indent=2))

    @classmethod
    def from_config(cls, config: dict) -> "Vocoder":
        return cls(
            FlowDecoder(_from_dict(FlowConfig, config.get("flow", {}))),
            Generator(_from_dict(GeneratorConfig, config.get("generator", {}))),
            _from_dict(MelConfig, config.get("mel", {})),
            _from_dict(StreamConfig, config.get("stream", {})),
            int(config.get("seed", 1234)),
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Vocoder":
        directory = Path(directory)
        cfg_path, weights = directory / "config.json", directory / "model.safetensors"
        if not cfg_path.exists() or not weights.exists():
            raise FileNotFoundError(f"{directory} must hold config.json and model.safetensors")
        model = cls.from_config(json.loads(cfg_path.read_text()))
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state)
        return model.eval()

    def reseeded(self, seed: int) -> "Vocoder":
        """The same weights with another noise seed (shares the modules): a reference for sampling variation."""
        return Vocoder(self.flow, self.generator, self.mel_config, self.stream_config, seed).eval()

    # -- noise --------------------------------------------------------------------------------------------
    def noise(self, start_frame: int, n_frames: int, block: int = 256) -> torch.Tensor:
        """Gaussian noise [1, n_mels, n_frames] that depends only on absolute frame positions."""
        n_mels = self.flow.config.n_mels
        parts, f = [], start_frame
        while f < start_frame + n_frames:
            b = f // block
            if b not in self._noise_blocks:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
                self._noise_blocks[b] = torch.randn(n_mels, block, generator=gen)
            lo = f - b * block
            hi = min(block, start_frame + n_frames - b * block)
            parts.append(self._noise_blocks[b][:, lo:hi])
            f = b * block + hi
        return torch.cat(parts, dim=1).unsqueeze(0)

    # -- decoding -----------------------------------------------------------------------------------------
    def check_request(self, voice: str, pitch_st: float) -> tuple[int, float]:
        idx = self.flow.voice_index(voice) if voice != OTHER_VOICE else -1
        if idx < 0:
            raise ValueError(f"unknown voice {voice!r}; known voices: {', '.join(self.voices)}")
        lo, hi = PITCH_RANGE_ST
        if not np.isfinite(pitch_st) or not (lo <= float(pitch_st) <= hi):
            raise ValueError(f"pitch_st {pitch_st!r} is outside the allowed range {lo}..{hi} semitones")
        return idx, float(pitch_st)

    def request_pitch(self, pitch_st: float, emotion: str = "neutral") -> float:
        """The pitch shift to decode an answer with, from the persona's pitch and its emotion (whose mean F0 shift is
        `EMOTIONS[emotion].pitch_shift_st`; unknown names count as neutral). When pitch 0 is the tokens' own level
        (`pitch_reference` "tokens") the tokens already carry the emotion's pitch (the backbone speaks it), so only
        the persona's shift is applied; when it is the voice's neutral F0 ("voice"), the vocoder sets the level and
        both count (`controls.emotion_pitch`, clamped to the allowed range)."""
        if self.flow.config.pitch_reference != "voice":
            return float(pitch_st)
        return emotion_pitch(pitch_st, emotion)

    @torch.no_grad()
    def tokens_to_mel(self, tokens: np.ndarray, voice_idx: int, pitch_st: float, start_token: int = 0,
                      n_steps: int | None = None, conditions: SamplingConditions | None = None) -> torch.Tensor:
        fpt = self.flow.config.frames_per_token
        tok = torch.from_numpy(np.ascontiguousarray(tokens)).long().unsqueeze(0)
        noise = self.noise(start_token * fpt, tok.shape[1] * fpt)
        return self.flow.sample(tok, torch.tensor([voice_idx]), torch.tensor([pitch_st]), noise, n_steps, conditions)

    @torch.no_grad()
    def _decode_window(self, tokens: np.ndarray, start_token: int, voice_idx: int, pitch_st: float,
                       phase0: float = 0.0, conditions: SamplingConditions | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """-> (wav, source phase at each frame boundary of the window)."""
        mel = self.tokens_to_mel(tokens, voice_idx, pitch_st, start_token, conditions=conditions)
        start_frame = start_token * self.flow.config.frames_per_token
        wav, phases = self.generator(mel, start_frame=start_frame, phase0=torch.tensor([phase0]), return_phase=True)
        phases = phases[0].numpy() if phases is not None else np.zeros(mel.shape[-1] + 1)
        return wav[0].float().numpy(), phases

    def decode(self, semantic_ids: Iterable[int], voice: str = "joe", pitch_st: float = 0.0) -> tuple[np.ndarray, int]:
        """Offline: semantic codes (0..n_codes-1, 25 Hz) -> (float32 mono wav, sample rate)."""
        tokens = _as_token_array(semantic_ids, self.flow.config.n_codes)
        if tokens.size == 0:
            raise ValueError("no semantic ids to decode")
        idx, pitch = self.check_request(voice, pitch_st)
        return self._decode_window(tokens, 0, idx, pitch)[0].astype(np.float32), self.sample_rate

    def stream(self, voice: str = "joe", pitch_st: float = 0.0) -> "VocoderStream":
        return VocoderStream(self, voice, pitch_st)


class VocoderStream:
    """Chunked decoding: `push(ids)` returns the audio that became final, `flush()` the rest.

    Each chunk re-decodes `left_context_tokens` already-emitted tokens and waits for `lookahead_tokens` more;
    consecutive chunks overlap by `crossfade_samples` and are crossfaded with equal-power fades.
    """

    def __init__(self, vocoder: Vocoder, voice: str, pitch_st: float):
        self.vocoder = vocoder
        self.voice_idx, self.pitch_st = vocoder.check_request(voice, pitch_st)
        self.cfg = vocoder.stream_config
        self.tokens = np.zeros(0, dtype=np.int64)
        self.emitted = 0  # tokens whose audio has left (apart from the held crossfade tail)
        self.n_chunks = 0  # chunks emitted
        self.first_chunk_tokens = self.cfg.first_chunk_tokens  # raised by share_cores() on a busy server
        self.tail: np.ndarray | None = None
        self.closed = False
        self.phases: dict[int, float] = {0: 0.0}  # source phase at absolute frame boundaries already decoded
        self._conditions: SamplingConditions | None = None  # the voice's and pitch's share of sampling, reused
        n = self.cfg.crossfade_samples
        ramp = np.linspace(0.0, np.pi / 2, n, dtype=np.float64)
        self.fade_in, self.fade_out = np.sin(ramp).astype(np.float32) ** 2, np.cos(ramp).astype(np.float32) ** 2

    def share_cores(self, answers: int) -> None:
        """`answers` streams share the cores, so each advances about that many times slower: make the first chunk
        that many times longer (at most one regular chunk). Only before the first chunk has left."""
        if self.n_chunks == 0 and answers > 1:
            self.first_chunk_tokens = min(max(self.cfg.chunk_tokens, self.cfg.first_chunk_tokens),
                                          self.cfg.first_chunk_tokens * answers)

    def push(self, semantic_ids: Iterable[int]) -> np.ndarray:
        """Add tokens; return the audio of every chunk they complete (see `push_chunks`)."""
        out = list(self.push_chunks(semantic_ids))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def push_chunks(self, semantic_ids: Iterable[int]) -> Iterator[np.ndarray]:
        """Add tokens and yield each completed chunk as soon as it is decoded. The first chunk is
        `first_chunk_tokens` long (fast first audio); the second catches up with what is already there (at least
        `first_chunk_tokens`, at most `chunk_tokens`), so a first push of a whole 15-token span leaves 480 ms of
        audio, not 200 ms, buffered at the client before the next span arrives; the third chunk is `chunk_tokens`,
        later ones `max_chunk_tokens` (when set): once the client holds a buffer, longer chunks cut the share of
        re-decoded left context (the vocoder's main streaming cost). With `buffered_lookahead_tokens`, chunks after the
        second leave at the same moment but end earlier, so that more of the tokens already there serve as their right
        context."""
        if self.closed:
            raise RuntimeError("this stream was flushed; open a new one with Vocoder.stream()")
        new = _as_token_array(semantic_ids, self.vocoder.flow.config.n_codes)
        self.tokens = np.concatenate([self.tokens, new])
        first, look = self.first_chunk_tokens, self.cfg.lookahead_tokens
        while True:
            if self.n_chunks == 0:
                size = first
            elif self.n_chunks == 1:
                size = min(self.cfg.chunk_tokens, max(first, len(self.tokens) - look - self.emitted))
            elif self.n_chunks == 2:
                size = self.cfg.chunk_tokens
            else:
                size = max(self.cfg.chunk_tokens, self.cfg.max_chunk_tokens)
            end = self.emitted + size
            if len(self.tokens) < end + look:
                break
            if self.n_chunks >= 2:  # keep up to buffered_lookahead_tokens of what is there as right context
                shortest = min(end, self.emitted + self.cfg.first_chunk_tokens)
                end = max(shortest, min(end, len(self.tokens) - self._right_context()))
            yield self._emit(end, final=False)

    def _right_context(self) -> int:
        """Tokens after a chunk's end that its window decodes (when they are there)."""
        if self.n_chunks < 2:
            return self.cfg.lookahead_tokens
        return max(self.cfg.lookahead_tokens, self.cfg.buffered_lookahead_tokens)

    def flush(self) -> np.ndarray:
        if self.closed:
            raise RuntimeError("this stream was already flushed")
        self.closed = True
        if self.emitted < len(self.tokens):
            return self._emit(len(self.tokens), final=True)
        return self.tail if self.tail is not None else np.zeros(0, dtype=np.float32)

    def _sampling_conditions(self) -> SamplingConditions:
        flow = self.vocoder.flow
        if self._conditions is None or self._conditions.n_steps != flow.config.n_steps:
            self._conditions = flow.sampling_conditions(torch.tensor([self.voice_idx]), torch.tensor([self.pitch_st]))
        return self._conditions

    def _emit(self, end: int, final: bool) -> np.ndarray:
        spt, xf = self.vocoder.samples_per_token, self.cfg.crossfade_samples
        a = self.emitted
        ctx0 = max(0, a - self.cfg.left_context_tokens)
        ctx1 = len(self.tokens) if final else min(len(self.tokens), end + self._right_context())
        fpt = self.vocoder.flow.config.frames_per_token
        wav, phases = self.vocoder._decode_window(
            self.tokens[ctx0:ctx1], ctx0, self.voice_idx, self.pitch_st, self.phases.get(ctx0 * fpt, 0.0),
            self._sampling_conditions(),
        )
        # keep the phase where the next windows will start, so the harmonic source runs on without a jump
        for f in range(a * fpt, end * fpt + 1):
            self.phases.setdefault(f, float(phases[f - ctx0 * fpt]))
        keep_from = (end - self.cfg.left_context_tokens) * fpt
        self.phases = {f: p for f, p in self.phases.items() if f >= keep_from}
        start = (a - ctx0) * spt
        seg = wav[start:] if final else wav[start : (end - ctx0) * spt + xf]
        seg = seg.astype(np.float32, copy=True)
        if self.tail is not None:
            seg[:xf] = self.tail * self.fade_out + seg[:xf] * self.fade_in
        self.emitted = end
        self.n_chunks += 1
        if final:
            self.tail = None
            return seg
        self.tail = seg[-xf:].copy()
        return seg[:-xf]
