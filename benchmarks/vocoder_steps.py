"""Intelligibility and speed of the shipped vocoder per number of Euler steps (and noise temperature), no corpus needed.

Piper (joe) speaks fixed NPC-style sentences; the shipped tokenizer turns them into semantic tokens; the vocoder
decodes them with each setting; Whisper tiny.en transcribes; WER against the sentence text. This is how the shipped
`n_steps` was chosen (docs/vocoder.md).

    python -m benchmarks.vocoder_steps --settings 6:0.667 4:0.667 3:0.667 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from npc_server.audio import resample
from npc_server.paths import DEFAULT_MODEL_DIR

SENTENCES = [
    "A room for the night costs ten gold.", "The bakery is on the north side of the market square.",
    "Take the road past the old mill and turn left at the bridge.", "I have three apples and I buy four more.",
    "The blacksmith sells iron swords for twenty silver.", "Welcome traveller, what can I do for you today?",
    "The guards closed the north gate at sunset.", "Bring me five wolf pelts and I will pay you well.",
    "My tea is brewed from leaves of the eastern hills.", "Twelve plus seven makes nineteen.",
    "The river runs cold in the winter months.", "Come back tomorrow and I will have your armour ready.",
    "The mayor lives in the big house by the chapel.", "Fresh bread costs two copper coins a loaf.",
    "Follow the east road until you reach the windmill.", "Nine minus four leaves you with five.",
    "The old tower was built three hundred years ago.", "You can sleep in the stable if you have no money.",
    "A bowl of stew and a mug of ale is four silver.", "The merchant caravan arrives every second morning.",
    "Beware of the wolves in the dark forest at night.", "The healer lives behind the well near the temple.",
    "My brother went north to fight the bandits last spring.", "If you find my lost ring I will give you a reward.",
    "The harbour is south of the fish market.", "Six times three is eighteen.",
    "A steel shield will cost you forty gold pieces.", "The festival starts when the moon is full.",
    "Speak to the captain of the guard about the job.", "The bridge over the river collapsed in the storm.",
    "Good morning to you, the weather is fine today.", "I only sell the finest green tea in the city.",
    "Half of twenty is ten.", "The library is open from dawn until dusk.",
    "Thank you for your help, safe travels friend.", "The key to the cellar hangs behind the bar.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--settings", nargs="+", default=["6:0.667", "4:0.667", "3:0.667"],
                    help="n_steps:temperature pairs to compare")
    ap.add_argument("--voice", default="joe")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from npc_server.eval.metrics import Listener, normalize_text, word_errors
    from npc_server.tokenizer import AudioTokenizer
    from npc_server.training.corpus.render import SR, PiperEngine
    from npc_server.vocoder import Vocoder

    torch.set_num_threads(args.threads)
    vocoder = Vocoder.from_pretrained(f"{args.model_dir}/vocoder")
    tokenizer = AudioTokenizer.from_pretrained(f"{args.model_dir}/tokenizer")
    piper, listener = PiperEngine(threads=args.threads), Listener(threads=args.threads)
    refs = [normalize_text(s) for s in SENTENCES]
    n_words = sum(map(len, refs))
    codes, source_errors = [], 0
    for text, ref in zip(SENTENCES, refs):
        wav16 = resample(piper.synth(text), SR, 16000)  # piper noise is not seedable: sources vary slightly per run
        codes.append(tokenizer.encode(wav16, 16000).semantic.numpy())
        source_errors += word_errors(ref, normalize_text(listener.transcribe(wav16, 16000)))
    print(f"{len(SENTENCES)} sentences, {n_words} words; source audio WER {source_errors / n_words:.1%}")
    for setting in args.settings:
        steps, temperature = setting.split(":")
        vocoder.flow.config.n_steps, vocoder.flow.config.temperature = int(steps), float(temperature)
        errors, compute, audio = 0, 0.0, 0.0
        for ref, c in zip(refs, codes):
            t0 = time.perf_counter()
            wav, sr = vocoder.decode(c, voice=args.voice)
            compute += time.perf_counter() - t0
            audio += len(wav) / sr
            errors += word_errors(ref, normalize_text(listener.transcribe(resample(wav, sr, 16000), 16000)))
        print(f"n_steps {steps:>2}, temperature {temperature}: WER {errors / n_words:.1%}, offline RTF {compute / audio:.3f}")


if __name__ == "__main__":
    main()
