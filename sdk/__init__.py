"""Python client SDK for npc-voice: `NpcClient(...).speak(npc=..., audio=...)` streams the NPC's spoken answer."""

from sdk.client import Answer, AudioEvent, EndEvent, NpcClient, NpcError, Speech, TextEvent

__all__ = ["Answer", "AudioEvent", "EndEvent", "NpcClient", "NpcError", "Speech", "TextEvent"]
