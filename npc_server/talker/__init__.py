"""The talker: answer text -> phones -> 25 Hz semantic audio tokens that the vocoder speaks (issue "Speak clearly")."""

from npc_server.talker.frontend import Phones, phonemize
from npc_server.talker.generator import Sampling, Span, TalkerStream, synthesize
from npc_server.talker.model import Talker, TalkerConfig

__all__ = ["Phones", "Sampling", "Span", "Talker", "TalkerConfig", "TalkerStream", "phonemize", "synthesize"]
