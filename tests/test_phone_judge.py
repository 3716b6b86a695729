"""Mel phone judge tests: it learns phones from real (espeak) speech, is local, round-trips through its checkpoint,
and as a training loss its gradient reaches the flow only; `train vocoder --stage judge` and `--phone-weight` run."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from npc_server.audio.io import load_audio, resample, save_wav
from npc_server.eval.metrics import judge_phone_error_rate
from npc_server.paths import DEFAULT_MODEL_DIR
from npc_server.tokenizer.phones import PhoneInventory
from npc_server.training import train_phone_judge as tj
from npc_server.training import train_vocoder as tv
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.train_vocoder import data as tv_data
from npc_server.training.train_vocoder import flow_stage as tv_flow
from npc_server.vocoder import FlowConfig, FlowDecoder, Generator, GeneratorConfig, LogMel, MelConfig
from npc_server.vocoder.phone_judge import PhoneJudge, PhoneJudgeConfig

torch.set_num_threads(1)

PHONES = json.loads((DEFAULT_MODEL_DIR / "tokenizer" / "config.json").read_text())["phones"]
SENTENCES = [("A room costs five silver coins a night.", "gb_female", "en-gb+f3", "train"),
             ("Head north past the old bridge.", "scot_male", "en-gb-scotland+m3", "train"),
             ("The captain is waiting for you at the gate.", "gb_female", "en-gb+f3", "heldout")]


def espeak_ipa(text: str, voice: str) -> str:
    out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", voice, text], check=True, capture_output=True, text=True)
    return " ".join(out.stdout.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three espeak-ng utterances with their IPA, in the corpus contract layout (one held out)."""
    root = tmp_path_factory.mktemp("judge_corpus")
    (root / "audio").mkdir()
    rows = []
    for i, (text, speaker, voice, split) in enumerate(SENTENCES):
        path = root / "audio" / f"u{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        wav, sr = load_audio(path, target_sr=22050)
        save_wav(path, wav, sr)
        rows.append({"id": f"u{i}", "split": split, "role": "npc", "language": "en", "accent": "gb",
                     "speaker": speaker, "controls": {"emotion": "neutral", "speed": 1.0, "pitch_st": 0.0},
                     "text": text, "phonemes": espeak_ipa(text, voice), "audio": f"audio/u{i}.wav", "sr": 22050,
                     "duration": len(wav) / sr})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def small_judge() -> PhoneJudge:
    return PhoneJudge(PhoneJudgeConfig(phones=PHONES, dim=64, layers=2))


def test_judge_learns_phones_of_real_speech(corpus):
    torch.manual_seed(0)
    rows = read_manifest(corpus)
    mel_cache = tv_data.build_mel_cache([r for r in rows if r["split"] == "train"], corpus, MelConfig(), 0.0, 0)
    items = tj.items_from_mel_cache(mel_cache, rows, PhoneInventory(PHONES))
    assert len(items) == 2 and all(len(it.phones) > 10 for it in items)
    judge = small_judge()
    per_before = judge_phone_error_rate(judge, [it.mel for it in items], [it.phones for it in items])
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3)
    batch = tj.collate(items)
    first = float(tj.ctc_loss(judge, batch).detach())
    for _ in range(150):
        loss = tj.ctc_loss(judge, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(tj.ctc_loss(judge, batch).detach()) < 0.5 * first
    per_after = judge_phone_error_rate(judge.eval(), [it.mel for it in items], [it.phones for it in items])
    assert per_after < 0.8 * per_before and per_after < 0.9


def test_judge_is_local_and_round_trips(tmp_path):
    """A segment is judged like the same frames inside the whole utterance, away from the cut (conv only)."""
    torch.manual_seed(0)
    judge = small_judge().eval()
    wav = torch.randn(48000) * 0.1
    mel = LogMel(MelConfig())(wav)  # [1, 80, F]
    with torch.no_grad():
        whole = judge(mel)
        part = judge(mel[..., 40:120])
    margin = 2 + 2 * judge.config.layers  # receptive field in 50 Hz frames
    torch.testing.assert_close(part[:, margin:-margin], whole[:, 20 + margin:60 - margin], atol=1e-5, rtol=1e-4)
    judge.save_pretrained(tmp_path / "j")
    again = PhoneJudge.from_pretrained(tmp_path / "j")
    with torch.no_grad():
        torch.testing.assert_close(again(mel), judge.half().float()(mel), atol=1e-3, rtol=1e-3)
    with pytest.raises(FileNotFoundError, match="train vocoder --stage judge"):
        PhoneJudge.from_pretrained(tmp_path / "missing")


def test_output_judges_train_the_flow_only(corpus):
    torch.manual_seed(0)
    flow = FlowDecoder(FlowConfig(dim=48, token_dim=48, n_heads=2, transformer_layers=1, res_blocks=1, cond_layers=1))
    judge, gen = small_judge(), Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2))
    rows = read_manifest(corpus)
    mel_cache = tv_data.build_mel_cache(rows[:2], corpus, MelConfig(), 0.0, 0)
    tokens = {uid: torch.randint(0, 4096, (it["mels"][0][0].shape[-1] // 4,)) for uid, it in mel_cache.items()}
    examples = tv_flow.join_caches(mel_cache, tokens, flow.config)
    batch = tv_flow.flow_batch(examples, 3, 20, 4, random.Random(0))

    judges = tv_flow.OutputJudges(judge, gen, phone_weight=0.5, f0_weight=0.2)
    torch.manual_seed(1)
    loss, parts = judges(flow, *batch, bf16=False)
    assert set(parts) == {"flow", "phone_kl", "f0_st"} and parts["phone_kl"] > 0 and parts["f0_st"] >= 0
    torch.testing.assert_close(loss.item(), parts["flow"] + 0.5 * parts["phone_kl"] + 0.2 * parts["f0_st"],
                               atol=1e-4, rtol=1e-4)
    torch.manual_seed(1)  # same t and noise: the flow term is the plain flow loss
    with torch.no_grad():
        assert abs(float(tv_flow.flow_loss(flow, *batch, bf16=False)) - parts["flow"]) < 1e-5
    loss.backward()
    assert all(p.grad is None for p in [*judge.parameters(), *gen.parameters()])
    assert flow.x_out.weight.grad is not None and flow.x_out.weight.grad.abs().sum() > 0


def test_flow_estimate_is_the_clean_mel_when_the_velocity_is_exact(corpus):
    """x_t + (1 - t) v recovers the target mel when v is the true OT-CFM velocity."""
    torch.manual_seed(0)
    flow = FlowDecoder(FlowConfig(dim=48, token_dim=48, n_heads=2, transformer_layers=1, res_blocks=1, cond_layers=1,
                                  sigma_min=0.0))
    c = flow.config
    mel = LogMel(MelConfig())(torch.from_numpy(resample(*load_audio(corpus / "audio" / "u0.wav"), 24000)))[..., :80]
    tokens = torch.randint(0, 4096, (1, 20))
    x1 = flow.pair_frames((mel - c.mel_mean) / c.mel_std)
    captured = {}

    def exact_velocity(x, t, cond, mu, g):  # x = (1 - t) x0 + t x1  ->  v = (x1 - x) / (1 - t)
        captured["t"] = t
        return (x1 - x) / (1 - t[:, None, None])

    flow.forward = exact_velocity
    _, estimate, t = flow.loss(mel, tokens, torch.tensor([0]), torch.tensor([0.0]), return_estimate=True)
    torch.testing.assert_close(estimate, mel, atol=1e-3, rtol=1e-4)
    assert torch.equal(t, captured["t"])


def test_cli_judge_stage_then_flow_with_judges(corpus, tmp_path):
    run, out, judge_dir = tmp_path / "run", tmp_path / "voc", tmp_path / "judge"
    common = ["--corpus", str(corpus), "--run-dir", str(run), "--out", str(out), "--threads", "1", "--batch", "2",
              "--phone-judge", str(judge_dir), "--judge-heldout", "5"]
    assert tv.main(["--stage", "judge", "--minutes", "0.05", *common]) == 0
    stats = json.loads((judge_dir / "training.json").read_text())
    assert stats["steps"] > 0 and stats["heldout_utterances"] == 1 and 0 <= stats["heldout_per"] <= 1.5
    assert PhoneJudge.from_pretrained(judge_dir).config.phones == PHONES
    mel_cache = torch.load(run / "mel_cache.pt", weights_only=False)
    torch.save({uid: torch.randint(0, 4096, (it["mels"][0][0].shape[-1] // 4,)).to(torch.int16)
                for uid, it in mel_cache.items()}, run / "token_cache.pt")
    assert tv.main(["--stage", "flow", "--minutes", "0.05", "--flow-segment-tokens", "20", "--phone-weight", "0.3",
                    "--f0-weight", "0.1", *common]) == 0
    info = json.loads((out / "training.json").read_text())["flow"]
    assert info["steps"] > 0 and info["phone_weight"] == 0.3 and info["f0_weight"] == 0.1
