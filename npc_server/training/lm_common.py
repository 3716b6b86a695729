"""Shared plumbing of the backbone stage entry points: data arguments, token-cache preparation, model bundles."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from npc_server.backbone.model import BackboneConfig, load_backbone, save_backbone
from npc_server.backbone.template import ChatTemplate
from npc_server.backbone.text_tokenizer import TOKENIZER_FILE, TextTokenizer
from npc_server.paths import DEFAULT_MODEL_DIR, DEFAULT_PERSONAS_DIR, data_dir
from npc_server.training.lm_data import TokenCache, tokenize_corpus
from npc_server.training.loop import barrier

log = logging.getLogger(__name__)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--corpus", type=Path, default=None, help="corpus root (default: <data dir>/corpus/default)")
    g.add_argument("--tokens", type=Path, default=None, help="audio-token cache (default: <corpus>/tokens)")
    g.add_argument("--audio-tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer",
                   help="AudioTokenizer used to fill the token cache when utterances are missing from it")
    g.add_argument("--synthetic-tokens", action="store_true",
                   help="fill the token cache with text-derived pseudo tokens (smoke runs/tests; not audio)")
    g.add_argument("--personas", type=Path, default=DEFAULT_PERSONAS_DIR, help="persona YAML folder")
    g.add_argument("--max-len", type=int, default=1024, help="drop examples longer than this many tokens")


def corpus_dir(args: argparse.Namespace) -> Path:
    path = args.corpus or data_dir() / "corpus" / "default"
    if not (path / "manifest.jsonl").is_file():
        raise FileNotFoundError(f"no corpus at {path} (run `npc-server train corpus` or pass --corpus)")
    return path


def prepare_token_cache(args: argparse.Namespace, rank: int, world: int) -> TokenCache:
    """The audio-token cache of the corpus, filled where needed. Synthetic (text-derived) tokens live in their own
    folder (`<corpus>/tokens_synthetic`) and a SOURCE file in each cache keeps the two kinds from mixing."""
    corpus = corpus_dir(args)
    kind = "synthetic" if args.synthetic_tokens else "audio-tokenizer"
    tokens = args.tokens or corpus / ("tokens_synthetic" if args.synthetic_tokens else "tokens")
    source = tokens / "SOURCE"
    if source.is_file() and source.read_text().strip() != kind:
        raise ValueError(f"token cache {tokens} holds {source.read_text().strip()} tokens, not {kind} ones")
    if rank == 0 and (args.synthetic_tokens or (args.audio_tokenizer and Path(args.audio_tokenizer).is_dir())):
        tokens.mkdir(parents=True, exist_ok=True)
        if not source.is_file():  # written atomically: other ranks may be reading it right now
            tmp = source.with_suffix(".tmp")
            tmp.write_text(kind + "\n")
            tmp.replace(source)
    if args.synthetic_tokens:
        if rank == 0:
            from npc_server.training.lm_synthetic import synthetic_token_cache

            synthetic_token_cache(corpus, tokens)
    elif args.audio_tokenizer and (Path(args.audio_tokenizer) / "config.json").is_file():
        from npc_server.tokenizer import AudioTokenizer

        barrier()  # the folder exists before the other ranks write into it
        tokenizer = AudioTokenizer.from_pretrained(args.audio_tokenizer)
        with torch.inference_mode():
            tokenize_corpus(corpus, tokenizer, tokens, rank=rank, world=world)
    barrier()
    return TokenCache(tokens)


def save_bundle(model: torch.nn.Module, config: BackboneConfig, text_tokenizer: TextTokenizer, directory: Path,
                dtype: torch.dtype | None = None) -> Path:
    """models/<name>/backbone layout: model.safetensors + config.json + tokenizer.json."""
    save_backbone(model, config, directory, dtype=dtype)
    text_tokenizer.save(directory)
    return directory


def load_bundle(directory: Path) -> tuple[torch.nn.Module, BackboneConfig, TextTokenizer, ChatTemplate]:
    model, config = load_backbone(directory)
    tok = TextTokenizer.from_pretrained(directory)
    return model, config, tok, ChatTemplate(config.layout, tok)


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(src) / TOKENIZER_FILE, dst / TOKENIZER_FILE)
