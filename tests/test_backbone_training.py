"""Backbone training stages on a tiny model: pretrain/SFT/DPO/merge run and reload, resume, DPO text mask, DDP sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npc_server.backbone.generator import Generator, SamplingConfig
from npc_server.backbone.template import (
    KIND_AUDIO,
    KIND_TEXT,
    Mode,
    SystemPrompt,
    UserTurn,
)
from npc_server.training import dpo, merge, pretrain, sft
from npc_server.training.lm_common import load_bundle
from npc_server.training.lm_data import (
    IGNORE,
    TokenCache,
    collate_pairs,
    dpo_examples,
    load_dialogues,
    sft_examples,
)
from npc_server.training.lm_synthetic import synthetic_corpus, synthetic_token_cache
from npc_server.training.losses import dpo_loss, sequence_logps
from npc_server.training.merge import merge_state_dicts

COMMON = ["--synthetic-tokens", "--threads", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bbcorpus")
    synthetic_corpus(root / "corpus", n_dialogues=30, seed=1)
    synthetic_token_cache(root / "corpus", root / "corpus" / "tokens")
    return root / "corpus"


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre")
    args = ["--corpus", str(corpus), *COMMON, "--preset", "tiny", "--text-vocab", "512", "--out", str(out),
            "--steps", "4", "--batch-size", "4", "--ckpt-every", "2", "--precision", "fp32"]
    assert pretrain.main(args) == 0
    return out


def test_pretrain_writes_a_loadable_bundle_and_log(pretrained):
    model, config, _, template = load_bundle(pretrained / "model")
    assert config.preset == "tiny" and config.n_text == 512
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["complete"] and summary["steps_done"] == 4 and summary["world"] == 1
    log = [json.loads(line) for line in (pretrained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r.get("text_loss", 1) > 0 and r.get("audio_loss", 1) > 0 and r["loss"] > 0 for r in log)
    assert any("audio_loss" in r for r in log) and any("text_loss" in r for r in log)
    gen = Generator(model, template)
    end = gen.generate(gen.start_session(SystemPrompt("guard")), UserTurn(text="Where is the smithy?"),
                       sampling=SamplingConfig(seed=0, max_new_tokens=40))
    assert end.generated_tokens > 0


def test_resume_equals_uninterrupted_run(corpus, pretrained, tmp_path):
    base = ["--corpus", str(corpus), *COMMON, "--text-tokenizer", str(pretrained / "model"), "--preset", "tiny",
            "--text-vocab", "512", "--steps", "4", "--batch-size", "3", "--ckpt-every", "1", "--precision", "fp32"]
    assert pretrain.main(base + ["--out", str(tmp_path / "a")]) == 0
    assert pretrain.main(base + ["--out", str(tmp_path / "b"), "--stop-after", "2"]) == 0
    first = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert not first["complete"] and not (tmp_path / "b" / "model").exists()
    assert pretrain.main(base + ["--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert second["resumed_from"] == 2 and second["complete"]
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_sft_examples_cover_history_modes_and_targets(corpus, pretrained):
    _, config, _, template = load_bundle(pretrained / "model")
    cache = TokenCache(corpus / "tokens")
    rows = {r["id"]: r for r in load_dialogues(corpus, "train")}
    examples = sft_examples(corpus, cache, template, split="train")
    assert len(examples) == len(rows)
    lay = config.layout
    modes = set()
    for enc in examples:
        rendered = template.render(enc.ids)
        first_target = enc.targets.index(True)
        # the target is exactly the final answer body: it starts right after <|assistant|><|mode:...|>
        assert enc.ids[first_target - 2] == lay.special("<|assistant|>")
        assert all(enc.targets[first_target:]) and not any(enc.targets[:first_target])
        modes.add(lay.special_name(enc.ids[first_target - 1]))
        if "Hello there." in rendered:  # multi-turn: history as typed text with a text-only answer
            assert "<|user|>Hello there.<|end|><|assistant|><|mode:text|>Good day, traveller.<|text_end|><|end|>" in rendered
    assert "<|mode:audio_text|>" in modes

    # SFT with an ASR-only pretraining mix above 1 (the ASR sequences repeat to fill it)
    from npc_server.training.lm_data import sft_training_set

    mixed = sft_training_set(corpus, cache, template, None, pretrain_mix=2.5, seed=0, max_len=4096,
                             pretrain_tasks=["asr"])
    extra = mixed[len(examples):]
    assert len(mixed) == len(examples) + int(2.5 * len(examples))
    assert all("<|task:asr|>" in template.render(e.ids) for e in extra)


def test_dialogue_prompt_uses_persona_defaults_and_per_turn_overrides(tmp_path):
    from npc_server.controls import Controls
    from npc_server.training.lm_data import dialogue_prompt, persona_infos

    infos = persona_infos(tmp_path / "no_personas")  # falls back to the corpus world's personas
    row = {"persona": "guard", "npc_voice": "scot_male", "language": "en", "accent": "scotland", "category": "price",
           "controls": {"emotion": "sad", "speed": 1.3, "pitch_st": -2.0}}
    system, override = dialogue_prompt(row, infos)
    assert system.controls == infos["guard"].controls and system.persona == "guard"
    assert override == Controls("scot_male", "en", "scotland", "sad", 1.3, -2.0)
    default = dict(row, controls={"emotion": infos["guard"].controls.emotion, "speed": 1.0, "pitch_st": 0.0})
    assert dialogue_prompt(default, infos)[1] is None  # persona defaults: no override tokens
    spoken = dict(row, category="control")  # "Say it slowly." is in the audio: the model must hear it
    assert dialogue_prompt(spoken, infos) == (system, None)
    from npc_server.paths import DEFAULT_PERSONAS_DIR

    yaml_infos = persona_infos(DEFAULT_PERSONAS_DIR)
    if "innkeeper" in yaml_infos and yaml_infos["innkeeper"].text:
        assert "Greta" in yaml_infos["innkeeper"].text


def test_dpo_log_probs_count_text_tokens_only(corpus, pretrained):
    model, config, _, template = load_bundle(pretrained / "model")
    cache = TokenCache(corpus / "tokens")
    pairs = dpo_examples(corpus, cache, template, split="train")
    assert pairs
    batch = collate_pairs(pairs[:3], config.layout.special("<|pad|>"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base = sequence_logps(logits, batch["labels"], batch["kinds"])
    # positions whose next token is an audio/special target must not move the DPO log-prob
    next_kind = torch.nn.functional.pad(batch["kinds"][:, 1:], (0, 1), value=-1)
    next_label = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    audio_pos = (next_label != IGNORE) & (next_kind == KIND_AUDIO)
    text_pos = (next_label != IGNORE) & (next_kind == KIND_TEXT)
    assert audio_pos.any() and text_pos.any()
    noisy = logits + 5.0 * torch.randn_like(logits) * audio_pos.unsqueeze(-1)
    torch.testing.assert_close(sequence_logps(noisy, batch["labels"], batch["kinds"]), base)
    noisy_text = logits + 5.0 * torch.randn_like(logits) * text_pos.unsqueeze(-1)
    assert not torch.allclose(sequence_logps(noisy_text, batch["labels"], batch["kinds"]), base)
    # with audio included the value differs: the mask really excludes audio targets
    assert not torch.allclose(sequence_logps(logits, batch["labels"], batch["kinds"], kind=None), base)
    # chosen and rejected differ only in text, and share prompt and audio
    n = int(batch["n_pairs"])
    assert not torch.equal(batch["input_ids"][:n], batch["input_ids"][n:])
    loss, metrics = dpo_loss(base[:n], base[n:], base[:n], base[n:], beta=0.1)
    assert abs(float(loss) - 0.6931) < 1e-3 and metrics["margin"] == 0.0


def test_merge_arithmetic():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([3])}
    c = {"w": torch.tensor([12.0, -9.0]), "n": torch.tensor([3])}
    m = merge_state_dicts([a, b, c], [5, 5, 1])
    torch.testing.assert_close(m["w"], (5 * a["w"] + 5 * b["w"] + c["w"]) / 11)
    assert torch.equal(m["n"], a["n"])
    half = merge_state_dicts([a.copy(), b.copy()], [1, 1])
    torch.testing.assert_close(half["w"].to(torch.float16), torch.tensor([2.0, 4.0], dtype=torch.float16))
    with pytest.raises(ValueError):
        merge_state_dicts([a, {"x": torch.zeros(2), "n": torch.tensor([3])}], [1, 1])
    with pytest.raises(ValueError):
        merge_state_dicts([a, b], [1, -1])
    with pytest.raises(ValueError):
        merge_state_dicts([a, {"w": a["w"], "n": torch.tensor([4])}], [1, 1])


def test_sft_dpo_merge_pipeline(corpus, pretrained, tmp_path):
    common = ["--corpus", str(corpus), *COMMON, "--batch-size", "2", "--steps", "2"]
    for seed in (1, 2):
        assert sft.main(common + ["--init", str(pretrained / "model"), "--out", str(tmp_path / f"sft{seed}"),
                                  "--seed", str(seed)]) == 0
    assert dpo.main(common + ["--init", str(tmp_path / "sft1" / "model"), "--out", str(tmp_path / "dpo"),
                              "--lr", "1e-4"]) == 0
    log = [json.loads(line) for line in (tmp_path / "dpo" / "train_log.jsonl").read_text().splitlines()]
    assert abs(log[0]["loss"] - 0.6931) < 1e-3  # policy == reference at the first step
    assert "reward_acc" in log[0]
    out = tmp_path / "merged"
    assert merge.main(["--inputs", f"{tmp_path / 'sft1' / 'model'}:5", f"{tmp_path / 'sft2' / 'model'}:5",
                       f"{tmp_path / 'dpo' / 'model'}:1", "--out", str(out), "--dtype", "fp32"]) == 0
    sd = [load_file(str(tmp_path / p / "model" / "model.safetensors")) for p in ("sft1", "sft2", "dpo")]
    merged = load_file(str(out / "model.safetensors"))
    for k in merged:
        torch.testing.assert_close(merged[k], (5 * sd[0][k] + 5 * sd[1][k] + sd[2][k]) / 11, atol=1e-6, rtol=1e-5)
    # the default (shipped) storage is fp16: the same mix, rounded
    assert merge.main(["--inputs", f"{tmp_path / 'sft1' / 'model'}:1", f"{tmp_path / 'sft2' / 'model'}:1",
                       "--out", str(tmp_path / "merged16")]) == 0
    half = load_file(str(tmp_path / "merged16" / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in half.values() if t.is_floating_point())
    torch.testing.assert_close(half["model.norm.weight"].float(),
                               (sd[0]["model.norm.weight"] + sd[1]["model.norm.weight"]) / 2, atol=2e-3, rtol=2e-3)
    assert not torch.equal(sd[0]["model.norm.weight"], sd[1]["model.norm.weight"])
    gen = Generator.from_pretrained(out)
    session = gen.start_session(SystemPrompt("merchant"))
    for mode in Mode:
        end = gen.generate(session, UserTurn(audio=list(range(40))), mode=mode,
                           sampling=SamplingConfig(seed=1, max_new_tokens=30))
        assert end.generated_tokens > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_keep_weights_in_sync(corpus, pretrained, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "npc_server.cli", "train", "sft",
           "--corpus", str(corpus), *COMMON, "--init", str(pretrained / "model"), "--out", str(out),
           "--steps", "3", "--batch-size", "2", "--lr", "1e-3"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and summary["complete"]
    a, b = summary["param_checksums"]
    assert a == pytest.approx(b, rel=1e-9)
    # the replicas really trained (moved away from the initial weights)
    init = load_file(str(pretrained / "model" / "model.safetensors"))
    trained = load_file(str(out / "model" / "model.safetensors"))
    assert any(not torch.equal(init[k], trained[k]) for k in init)


def test_tokenize_corpus_with_audio_tokenizer_on_real_speech(tmp_path):
    """tokenize_corpus against the AudioTokenizer contract (untrained tiny tokenizer, espeak-ng speech)."""
    import soundfile as sf

    from npc_server.tokenizer import AudioTokenizer, split_interleaved
    from npc_server.tokenizer import preset as tokenizer_preset
    from npc_server.training.corpus.manifest import read_manifest
    from npc_server.training.lm_data import pretrain_examples, tokenize_corpus

    corpus = synthetic_corpus(tmp_path / "corpus", n_dialogues=3, seed=0)
    rows = {r["id"]: r for r in read_manifest(corpus)}
    for row in rows.values():
        wav = corpus / row["audio"]
        wav.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["espeak-ng", "-w", str(wav), row["text"]], check=True)
        row["duration"] = sf.info(str(wav)).duration
    tok_dir = tmp_path / "audio_tokenizer"
    torch.manual_seed(0)
    AudioTokenizer(tokenizer_preset("tiny")).save_pretrained(tok_dir)
    tokenizer = AudioTokenizer.from_pretrained(tok_dir)
    assert tokenize_corpus(corpus, tokenizer, tmp_path / "tokens") == len(rows)
    assert tokenize_corpus(corpus, tokenizer, tmp_path / "tokens") == 0  # resumable: nothing left to do
    cache = TokenCache(tmp_path / "tokens")
    for uid, row in rows.items():
        toks = cache.get(uid)
        ling, sem = split_interleaved(torch.from_numpy(toks["interleaved"]))
        assert torch.equal(ling, torch.from_numpy(toks["linguistic"]))
        assert torch.equal(sem, torch.from_numpy(toks["semantic"]))
        assert abs(len(toks["semantic"]) / 25.0 - row["duration"]) < 0.3
    _, _, _, template = load_bundle_for_test(tmp_path)
    examples = pretrain_examples(corpus, cache, template)
    assert any(template.layout.audio_offset <= i for e in examples for i in e.ids)
    # --tasks: ASR-like sequences only (audio in, text out: one per cached train utterance), or text only
    asr = pretrain_examples(corpus, cache, template, tasks=["asr"])
    n_train = sum(r["split"] == "train" for r in rows.values())
    assert len(asr) == n_train and all(any(template.layout.audio_offset <= i for i in e.ids) for e in asr)
    text = pretrain_examples(corpus, cache, template, tasks=["text"])
    assert text and not any(template.layout.audio_offset <= i for e in text for i in e.ids)
    with pytest.raises(ValueError, match="unknown pretraining task"):
        pretrain_examples(corpus, cache, template, tasks=["asr", "nope"])


def load_bundle_for_test(tmp_path):
    from npc_server.backbone.model import build_model, preset
    from npc_server.backbone.template import ChatTemplate
    from npc_server.backbone.text_tokenizer import TextTokenizer

    tok = TextTokenizer.train(["How much is a room? A room costs ten gold."] * 3, vocab_size=300)
    config = preset("tiny", 512)
    return build_model(config), config, tok, ChatTemplate(config.layout, tok)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_backbone_memorises_synthetic_dialogues_end_to_end(tmp_path):
    """Training format and cached generation agree: after SFT to ~zero loss, greedy KV-cached generation from the
    spoken question reproduces the training answers' text and audio tokens exactly."""
    from npc_server.backbone.template import AssistantTurn
    from npc_server.training.lm_data import _bucket, dialogue_prompt, persona_infos

    corpus = synthetic_corpus(tmp_path / "corpus", n_dialogues=16, seed=0)
    common = ["--corpus", str(corpus), "--synthetic-tokens", "--personas", str(tmp_path / "none"),
              "--threads", "1", "--log-every", "50", "--batch-size", "8", "--lr", "3e-3"]
    assert pretrain.main(common + ["--preset", "tiny", "--text-vocab", "512", "--out", str(tmp_path / "pre"),
                                   "--steps", "100"]) == 0
    assert sft.main(common + ["--init", str(tmp_path / "pre" / "model"), "--out", str(tmp_path / "sft"),
                              "--steps", "250", "--pretrain-mix", "0"]) == 0
    gen = Generator.from_pretrained(tmp_path / "sft" / "model")
    cache = TokenCache(corpus / "tokens")
    n = ok = 0
    for row in load_dialogues(corpus, "train"):
        if not 16 <= _bucket(row["id"]) < 90:  # rows trained with spoken-only input and audio_text output
            continue
        system, override = dialogue_prompt(row, persona_infos(None))
        session = gen.start_session(system)
        for h in row["history"]:
            gen.add_turn(session, UserTurn(text=h["question"]), AssistantTurn(text=h["answer"], mode=Mode.TEXT))
        end = gen.generate(session, UserTurn(audio=cache.get(row["question_audio_id"])["interleaved"],
                                             controls=override),
                           sampling=SamplingConfig(temperature=0.0, max_new_tokens=200))
        n += 1
        ok += end.text == row["answer_text"] and end.audio.tolist() == cache.get(row["answer_audio_id"])["semantic"].tolist()
    assert n >= 5 and ok >= n - 1, f"{ok}/{n} answers reproduced"


def test_data_order_covers_each_epoch_once_and_buckets_lengths():
    import random as _random

    from npc_server.training.loop import DataOrder

    rng = _random.Random(0)
    lengths = [rng.randrange(10, 500) for _ in range(240)]
    b, world = 4, 2
    steps_per_epoch = len(lengths) // (b * world)

    def epoch(bucket: bool) -> list[list[list[int]]]:
        orders = [DataOrder(len(lengths), b, r, world, seed=3, lengths=lengths if bucket else None)
                  for r in range(world)]
        return [[o.indices(s) for o in orders] for s in range(steps_per_epoch)]

    for bucket in (False, True):
        steps = epoch(bucket)
        seen = [i for step in steps for rank in step for i in rank]
        assert sorted(seen) == list(range(len(lengths)))  # each example once per epoch, ranks disjoint
        assert steps == epoch(bucket)  # a function of the step: resumable
    padded = {bk: sum(max(lengths[i] for i in rank) * b for step in epoch(bk) for rank in step)
              for bk in (False, True)}
    assert padded[True] < 0.8 * padded[False]


def test_synthetic_and_real_token_caches_never_mix(corpus, tmp_path):
    import argparse

    from npc_server.training.lm_common import add_data_args, prepare_token_cache

    parser = argparse.ArgumentParser()
    add_data_args(parser)
    args = parser.parse_args(["--corpus", str(corpus), "--synthetic-tokens"])
    cache = prepare_token_cache(args, rank=0, world=1)
    assert cache.dir == corpus / "tokens_synthetic" and (cache.dir / "SOURCE").read_text().strip() == "synthetic"
    real = parser.parse_args(["--corpus", str(corpus), "--tokens", str(cache.dir),
                              "--audio-tokenizer", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="synthetic"):
        prepare_token_cache(real, rank=0, world=1)
