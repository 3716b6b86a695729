"""Audio utilities: wav/pcm I/O, resampling, validation, log-mel features."""

from npc_server.audio.io import (
    AudioError,
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    resample,
    save_wav,
    to_mono,
    validate_audio,
)

__all__ = [
    "AudioError",
    "float_to_pcm16",
    "load_audio",
    "pcm16_to_float",
    "resample",
    "save_wav",
    "to_mono",
    "validate_audio",
]
