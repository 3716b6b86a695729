"""Vocoder evaluation tests: WER text normalisation, F0 measures, and a full evaluate() run with samples."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from npc_server.audio.io import load_audio, resample, save_wav
from npc_server.eval import metrics
from npc_server.eval import vocoder_eval as ve
from npc_server.paths import DEFAULT_MODEL_DIR
from npc_server.vocoder import FlowConfig, FlowDecoder, Generator, GeneratorConfig, Vocoder
from npc_server.vocoder.phone_judge import PhoneJudge, PhoneJudgeConfig

torch.set_num_threads(1)


def test_normalize_and_wer():
    assert metrics.normalize_text("That'll be 25 coins, friend!") == "thatll be twenty five coins friend".split()
    assert metrics.number_words(1342) == "one thousand three hundred forty two"
    assert metrics.number_words(1005) == "one thousand five" and metrics.number_words(25_000) == "twenty five thousand"
    assert metrics.word_errors("a b c d".split(), "a x c".split()) == 2
    assert metrics.word_errors([], []) == 0


def test_f0_error_and_shift_measure():
    sr = 24000
    t = np.arange(sr) / sr
    a = 0.3 * np.sin(2 * np.pi * 150 * t).astype(np.float32)
    b = 0.3 * np.sin(2 * np.pi * 150 * 2 ** (3 / 12) * t).astype(np.float32)
    assert metrics.f0_error(a, sr, a, sr)["f0_err_st"] < 0.1
    assert abs(metrics.f0_error(a, sr, b, sr)["f0_err_st"] - 3.0) < 0.2
    assert abs(12 * np.log2(metrics.median_f0(b, sr) / metrics.median_f0(a, sr)) - 3.0) < 0.2


def test_voice_id_accuracy_separates_distinct_groups():
    rng = np.random.default_rng(0)
    feats = {"a": [rng.normal(0, 1, 4) for _ in range(4)], "b": [rng.normal(8, 1, 4) for _ in range(4)]}
    assert metrics.nearest_centroid_accuracy(feats) == 1.0


@dataclass
class _Tokens:
    semantic: torch.Tensor


class EnergyTokenizer:
    """Test double for the tokenizer contract: 25 Hz codes from frame energy."""

    def encode(self, wav, sr):
        x = resample(wav, sr, 16000)
        n = len(x) // 640
        db = 10 * np.log10((x[: n * 640].reshape(n, 640) ** 2).mean(1) + 1e-8)
        return _Tokens(torch.from_numpy(np.clip((db + 80) * 40, 0, 4095).astype(np.int64)))


@pytest.fixture(scope="module")
def heldout_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for i, (text, speaker, voice) in enumerate([("Welcome to the inn, traveller.", "gb_female", "en-gb+f3"),
                                                ("The bridge is closed until dawn.", "scot_male", "en-gb-scotland+m3")]):
        path = root / "audio" / f"h{i}.wav"
        path.parent.mkdir(exist_ok=True)
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        wav, sr = load_audio(path, target_sr=22050)
        save_wav(path, wav, sr)
        ipa = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", voice, text], check=True, capture_output=True,
                             text=True).stdout
        rows.append({"id": f"h{i}", "split": "heldout", "role": "npc", "language": "en", "accent": "gb",
                     "speaker": speaker, "controls": {}, "text": text, "phonemes": " ".join(ipa.split()),
                     "audio": f"audio/h{i}.wav",
                     "sr": 22050, "duration": len(wav) / sr})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_evaluate_end_to_end(heldout_corpus, tmp_path):
    torch.manual_seed(0)
    flow = FlowDecoder(FlowConfig(dim=32, token_dim=32, n_heads=2, transformer_layers=1, res_blocks=1, cond_layers=1))
    voc = Vocoder(flow, Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2))).eval()
    rows = metrics.heldout_rows(heldout_corpus, 5, 0)
    assert len(rows) == 2
    judge = PhoneJudge(PhoneJudgeConfig(phones=json.loads((DEFAULT_MODEL_DIR / "tokenizer" / "config.json")
                                                          .read_text())["phones"], dim=32, layers=1)).eval()
    res = ve.evaluate(voc, EnergyTokenizer(), rows, heldout_corpus, metrics.Listener(threads=1), tmp_path / "s",
                      n_timbre=2, threads=1, judge=judge)
    # the listener understands the source speech, and an untrained vocoder does not fool it
    assert res["wer_source"] < 0.5
    assert res["wer_resynth"] > 0.7
    assert set(res["voices"]) == set(voc.voices)
    assert 0.0 <= res["voice_id_accuracy"] <= 1.0
    assert len(res["pitch_shift"]) == 2 * 4 * len(voc.voices)  # 2 utterances x 4 shifts x every voice
    assert all("pitch_shift_within_1st" in row for row in res["voices"].values())  # NaN when unvoiced (untrained)
    assert res["rtf_offline"] > 0 and res["first_chunk_compute_ms_median"] > 0
    assert res["flow_sampling"] == {"n_steps": 6, "temperature": 0.667, "guidance": 0.0, "guidance_steps": 0,
                                    "guidance_carry": False}
    assert res["stream_rel_l2_vs_offline_max"] < 0.05
    assert res["stream_logmel_db_vs_offline_max"] < res["offline_other_noise_logmel_db_median"]
    by_voice = res["wer_by_voice"]
    assert set(by_voice) == {"gb_female", "scot_male"}
    assert sum(d["words"] for d in by_voice.values()) == res["words"]
    assert metrics.heldout_rows(heldout_corpus, 5, 0, speakers=["scot_male"])[0]["id"] == "h1"
    with pytest.raises(ValueError, match="of joe"):
        metrics.heldout_rows(heldout_corpus, 5, 0, speakers=["joe"])
    written = {p.name for p in (tmp_path / "s").iterdir()}
    assert "mels.png" in written and "0_h0_resynth.wav" in written and "voice_joe.wav" in written
    assert res["judge_per_source"] >= 0.5 and res["judge_per_resynth"] >= 0.5  # an untrained judge hears nothing
    md = ve.to_markdown(res)
    assert "WER" in md and "scot_male: resynthesised" in md and "tolerance" in md and "phone judge" in md
    assert "own neutral F0" in md and "guidance 0.0" in md


@pytest.mark.parametrize("flag", ["--n", "--timbre-utts", "--stream-utts"])
def test_cli_rejects_empty_samples(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        ve.main([flag, "0"])
    assert exc.value.code == 2
    assert "at least 1" in capsys.readouterr().err


def test_cli_rejects_guidance_for_a_flow_trained_without_cond_dropout(capsys):
    with pytest.raises(SystemExit) as exc:
        ve.main(["--guidance", "1.5"])  # the shipped flow has cond_dropout 0
    assert exc.value.code == 2 and "cond_dropout" in capsys.readouterr().err


def test_neutral_voice_f0_and_decoded_pitch_against_it(heldout_corpus, monkeypatch):
    rows = [json.loads(line) for line in (heldout_corpus / "manifest.jsonl").open()]
    rows = [{**r, "split": "train", "controls": {"emotion": "neutral", "pitch_st": 0.0}} for r in rows]
    ref = metrics.neutral_voice_f0(heldout_corpus, rows)
    assert set(ref) == {"gb_female", "scot_male"} and all(60 < f < 400 for f in ref.values())
    rows[0]["controls"]["emotion"] = "happy"  # only neutral utterances at persona pitch 0 count
    assert set(metrics.neutral_voice_f0(heldout_corpus, rows)) == {"scot_male"}
    assert metrics.neutral_voice_f0(heldout_corpus) == {}  # the fixture's manifest holds held-out rows only
    torch.manual_seed(0)
    flow = FlowDecoder(FlowConfig(dim=32, token_dim=32, n_heads=2, transformer_layers=1, res_blocks=1, cond_layers=1))
    voc = Vocoder(flow, Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2))).eval()
    monkeypatch.setattr(ve, "median_f0", lambda wav, sr: 150.0)  # an untrained vocoder decodes no voiced frame
    res = ve._timbre_and_pitch(voc, [np.arange(100, 140)], {"joe": 100.0, "gb_female": 300.0})
    assert res["voices"]["joe"]["reference_f0_hz"] == 100.0
    assert res["voices"]["joe"]["f0_vs_reference_st"] == pytest.approx(12 * np.log2(1.5))
    assert res["voices"]["gb_female"]["f0_vs_reference_st"] == pytest.approx(-12.0)
    assert res["f0_vs_reference_abs_st_mean"] == pytest.approx((12 * np.log2(1.5) + 12.0) / 2)
    assert "reference_f0_hz" not in res["voices"]["scot_male"]
