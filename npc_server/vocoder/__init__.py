"""Streaming flow-matching vocoder: semantic tokens -> mel (flow matching U-Net) -> 24 kHz waveform (Vocos-style)."""

from npc_server.vocoder.flow import FlowConfig, FlowDecoder
from npc_server.vocoder.generator import Generator, GeneratorConfig
from npc_server.vocoder.mel import LogMel, MelConfig, logmel_distance_db
from npc_server.vocoder.vocoder import STREAM_MEL_TOLERANCE_DB, STREAM_TOLERANCE, StreamConfig, Vocoder, VocoderStream

__all__ = [
    "FlowConfig", "FlowDecoder", "Generator", "GeneratorConfig", "LogMel", "MelConfig", "STREAM_MEL_TOLERANCE_DB",
    "STREAM_TOLERANCE", "StreamConfig", "Vocoder", "VocoderStream", "logmel_distance_db",
]
