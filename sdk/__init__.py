"""Python client SDK for npc-voice: `NpcClient(...).speak(npc=..., audio=...)` streams the NPC's spoken answer."""

from sdk.client import Answer, AudioEvent, EndEvent, LipSyncEvent, NpcClient, NpcError, Speech, TextEvent

__all__ = ["Answer", "AudioEvent", "EndEvent", "LipSyncEvent", "NpcClient", "NpcError", "Speech", "TextEvent"]
