"""`npc-server train vocoder`, by stage (`--stage`):

- cli.py: the command (arguments, which stages run);
- data.py: what the stages share: the utterance pick, PSOLA pitch-shifted and voice-swapped copies, the mel cache;
- generator_stage.py: the mel -> waveform generator (bootstrap audio, STFT losses);
- flow_stage.py: the token -> mel flow-matching decoder (token caches, examples, batches, judge losses);
- common.py: the time-budgeted, resumable training loop and writing the vocoder.

The mel phone judge (`--stage judge`) is trained by training/train_phone_judge.py on the same mel cache.
"""

from npc_server.training.train_vocoder.cli import main

__all__ = ["main"]
