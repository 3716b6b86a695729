"""Synthetic spoken NPC-dialogue corpus: game world, dialogue text, voices, rendering and the `train corpus` command."""
