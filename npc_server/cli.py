"""The `npc-server` command: a thin dispatcher; each subcommand lives in its own module with its own --help."""

from __future__ import annotations

import importlib
import sys

# command words -> "module:function"; each function takes the remaining argv and returns an exit code.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    # play: run the server and talk to its NPCs
    ("serve",): ("npc_server.service.serve:main", "run the gRPC + WebSocket bridge server"),
    ("say",): ("npc_server.service.say:main", "ask an NPC a question from a wav file and save its spoken answer"),
    ("personas",): ("npc_server.personas:main", "validate and list persona YAML files"),
    # develop: build, train and measure the models
    ("bench",): ("npc_server.bench:main", "latency benchmarks (time to first audio, RTF, concurrency)"),
    ("train", "corpus"): ("npc_server.training.corpus.cli:main", "synthesise the spoken NPC-dialogue corpus"),
    ("train", "tokenizer"): ("npc_server.training.train_tokenizer:main", "train the dual-codebook audio tokenizer"),
    ("train", "tokenizer-v2"): ("npc_server.training.train_tokenizer_v2:main",
                                "tokenizer v2: linguistic codebook on the frozen Whisper encoder + phone readout"),
    ("train", "hearing"): ("npc_server.training.hearing:main",
                           "backbone v2 stage 1: hear the audio tokens (transcribe, continue) on the pretrained LM"),
    ("train", "answer"): ("npc_server.training.answer:main",
                          "backbone v2 stage 2 (SFT): answer the player in character, hearing kept"),
    ("train", "prefer"): ("npc_server.training.prefer:main",
                          "backbone v2 stage 3 (DPO): prefer correct, in-character, short answers"),
    ("train", "dialogues"): ("npc_server.training.dialogues:main",
                             "NPC answers written offline by a pretrained instruct model (teacher data), checked"),
    ("train", "tts"): ("npc_server.training.tts:main",
                       "the talker: answer phones -> semantic audio tokens in the NPC's voice (speak)"),
    ("train", "readout"): ("npc_server.training.train_readout:main",
                           "retrain the linguistic codes' CTC phone readout (the PER probe) on frozen codes"),
    ("train", "vocoder"): ("npc_server.training.train_vocoder:main", "train the flow-matching vocoder"),
    ("train", "pretrain"): ("npc_server.training.pretrain:main", "backbone stage 1: pretraining"),
    ("train", "sft"): ("npc_server.training.sft:main", "backbone stage 2: supervised fine-tuning"),
    ("train", "dpo"): ("npc_server.training.dpo:main", "backbone stage 3: DPO on preference pairs"),
    ("train", "merge"): ("npc_server.training.merge:main", "backbone stage 4: weight merging (v1, and v2 by stacking the adapters)"),
    ("train", "draft"): ("npc_server.training.draft:main", "draft backbone for speculative audio decoding"),
    ("eval", "tokenizer"): ("npc_server.eval.tokenizer_eval:main", "evaluate the audio tokenizer"),
    ("eval", "tokenizer-v2"): ("npc_server.eval.tokenizer_v2_eval:main",
                               "tokenizer v2: phone error rate (corpus held-out, real recordings) and encoding cost"),
    ("eval", "listen"): ("npc_server.eval.listen_eval:main",
                         "how well the backbone hears: WER of its ASR-task transcripts of held-out questions"),
    ("eval", "vocoder"): ("npc_server.eval.vocoder_eval:main", "evaluate the vocoder"),
    ("eval", "tts"): ("npc_server.eval.tts_eval:main",
                      "the talker + vocoder: WER of spoken held-out sentences vs the voice's own TTS, speed, RTF"),
    ("eval", "npc"): ("npc_server.eval.npc_eval:main", "NPC-Eval: held-out spoken-answer evaluation"),
    ("eval", "off-script"): ("npc_server.eval.off_script:main",
                             "v2: questions outside every persona's knowledge: language, persona, teacher judge"),
    ("eval", "make-set"): ("npc_server.eval.eval_set:main",
                           "pack a corpus's held-out questions into the small eval set shipped in data/eval/npc"),
    ("pretrained", "prepare"): ("npc_server.pretrained.cli:main",
                                "check the pretrained base packages and convert them once into the local cache"),
}

# the commands of someone who runs the server; all the others develop the models
PLAY: tuple[tuple[str, ...], ...] = (("serve",), ("say",), ("personas",))


def _usage() -> str:
    lines = ["usage: npc-server <command> [options]"]
    groups = (("play (run the server, talk to its NPCs)", [w for w in COMMANDS if w in PLAY]),
              ("develop (build, train and measure the models)", [w for w in COMMANDS if w not in PLAY]))
    width = max(len(" ".join(words)) for words in COMMANDS)
    for title, commands in groups:
        lines += ["", f"{title}:"]
        lines += [f"  {' '.join(words):<{width}}  {COMMANDS[words][1]}" for words in commands]
    lines += ["", "Run `npc-server <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from npc_server import __version__

        print(f"npc-server {__version__}")
        return 0
    for words in sorted(COMMANDS, key=len, reverse=True):
        if tuple(argv[: len(words)]) == words:
            target, _ = COMMANDS[words]
            module_name, func_name = target.split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and module_name.startswith(exc.name):
                    print(f"npc-server: `{' '.join(words)}` is not built yet in this version", file=sys.stderr)
                    return 2
                raise
            from npc_server.pretrained.packages import MissingPackageError

            try:
                return int(getattr(module, func_name)(argv[len(words):]) or 0)
            except MissingPackageError as exc:  # one line naming the package and the command, no traceback
                print(f"npc-server {' '.join(words)}: {exc}", file=sys.stderr)
                return 2
    print(f"npc-server: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
