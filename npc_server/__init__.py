"""npc-voice: end-to-end NPC voice dialogue server (audio question in, spoken answer streamed out)."""

__version__ = "0.1.0"
