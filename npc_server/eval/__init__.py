"""NPC-Eval and component evaluations: tokenizer, vocoder, spoken answers (judged by Whisper tiny.en)."""
