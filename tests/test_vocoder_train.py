"""Vocoder training tests: losses decrease on real audio, the flow cache follows the corpus contract, the CLI runs."""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from npc_server.audio.io import load_audio, resample, save_wav
from npc_server.training import train_vocoder as tv
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.train_vocoder import data as tv_data
from npc_server.training.train_vocoder import flow_stage as tv_flow
from npc_server.training.train_vocoder import generator_stage as tv_gen
from npc_server.vocoder import FlowConfig, FlowDecoder, Generator, GeneratorConfig, LogMel, MelConfig, Vocoder

torch.set_num_threads(1)

SENTENCES = ["A room costs five silver coins a night.", "Head north past the old bridge.",
             "The captain is waiting for you at the gate."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A three-utterance corpus in the corpus contract layout, spoken by espeak-ng."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    rows = []
    for i, (text, speaker, voice) in enumerate(zip(SENTENCES, ["gb_female", "scot_male", "player_007"],
                                                     ["en-gb+f3", "en-gb-scotland+m3", "en-us+m2"])):
        path = root / "audio" / f"u{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        wav, sr = load_audio(path, target_sr=22050)
        save_wav(path, wav, sr)
        rows.append({"id": f"u{i}", "split": "train", "role": "npc" if i < 2 else "player", "language": "en",
                     "accent": "gb", "speaker": speaker, "controls": {"emotion": "neutral", "speed": 1.0, "pitch_st": 0.0},
                     "text": text, "phonemes": "", "audio": f"audio/u{i}.wav", "sr": 22050,
                     "duration": len(wav) / sr})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@dataclass
class _Tokens:
    semantic: torch.Tensor


class EnergyTokenizer:
    """Test double for the audio tokenizer contract: 25 Hz codes from quantised frame energy of 16 kHz audio."""

    def encode(self, wav: np.ndarray, sr: int) -> _Tokens:
        x = resample(wav, sr, 16000)
        n = len(x) // 640
        frames = x[: n * 640].reshape(n, 640)
        db = 10 * np.log10((frames**2).mean(1) + 1e-8)
        return _Tokens(torch.from_numpy(np.clip((db + 80) * 40, 0, 4095).astype(np.int64)))


def small_flow_config() -> FlowConfig:
    return FlowConfig(dim=48, token_dim=48, n_heads=2, transformer_layers=1, res_blocks=1, cond_layers=1)


def test_flow_cache_follows_corpus(corpus):
    rows = tv_data.pick_utterances(read_manifest(corpus), "train", max_hours=1.0, seed=0)
    assert [r["role"] for r in rows][:2] == ["npc", "npc"]
    cfg = small_flow_config()
    examples = tv_flow.build_flow_cache(rows, corpus, EnergyTokenizer(), cfg, MelConfig(), pitch_aug=1.0, seed=0)
    assert len(examples) == 6  # each utterance plus its pitch-shifted copy
    for ex in examples:
        assert ex.mel.shape == (80, 4 * ex.tokens.shape[0])
    voices = {cfg.voices[ex.voice] for ex in examples}
    assert voices == {"gb_female", "scot_male", "<other>"}
    shifted = [ex for ex in examples if ex.pitch_st != 0]
    # labelled with the measured shift, which is within a fraction of a semitone of the requested +-1..7 here
    assert len(shifted) == 3 and all(0.5 <= abs(ex.pitch_st) <= 7.5 for ex in shifted)


def test_psola_shift_moves_f0(corpus):
    import parselmouth

    wav, sr = load_audio(corpus / "audio" / "u1.wav")
    up = tv_data.psola_pitch_shift(wav, sr, 4.0)

    def median_f0(x):
        f = parselmouth.Sound(x.astype(np.float64), sr).to_pitch().selected_array["frequency"]
        return np.median(f[f > 0])

    assert len(up) == len(wav)
    assert abs(12 * np.log2(median_f0(up) / median_f0(wav)) - 4.0) < 1.0


def test_pitch_copies_are_labelled_with_the_shift_reached(corpus):
    """PSOLA cannot take a very low voice much lower: the measured label says so instead of the requested shift."""
    wav, sr = load_audio(corpus / "audio" / "u1.wav")
    assert abs(tv_data.measured_shift_st(wav, tv_data.psola_pitch_shift(wav, sr, -3.0), sr) + 3.0) < 0.5
    low = tv_data.psola_pitch_shift(wav, sr, -10.0)  # scot_male (~100 Hz) taken down to ~56 Hz
    floor = tv_data.measured_shift_st(low, tv_data.psola_pitch_shift(low, sr, -7.0), sr)
    assert np.isfinite(floor) and floor > -5.0  # asked for -7 st, reached much less


def test_flow_training_step_decreases_loss(corpus):
    torch.manual_seed(0)
    cfg = small_flow_config()
    rows = tv_data.pick_utterances(read_manifest(corpus), "train", 1.0, 0)
    examples = tv_flow.build_flow_cache(rows, corpus, EnergyTokenizer(), cfg, MelConfig(), pitch_aug=0.0, seed=0)
    flow = FlowDecoder(cfg)
    batch = tv_flow.flow_batch(examples, 4, 30, cfg.frames_per_token, random.Random(0))
    opt = torch.optim.AdamW(flow.parameters(), lr=2e-3)

    def eval_loss():
        torch.manual_seed(123)  # same noise and t for a fair before/after comparison
        with torch.no_grad():
            return float(tv_flow.flow_loss(flow, *batch, bf16=False))

    before = eval_loss()
    for _ in range(30):
        loss = tv_flow.flow_loss(flow, *batch, bf16=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * before


def test_generator_training_step_decreases_loss(corpus):
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(dim=48, intermediate_dim=96, n_layers=2))
    wav, _ = load_audio(corpus / "audio" / "u0.wav", target_sr=24000)
    batch = torch.from_numpy(wav[: 2 * 9600].copy()).view(2, 9600)
    f0 = torch.stack([torch.from_numpy(tv_gen.frame_f0(b.numpy(), 24000, 0.01, 40)) for b in batch])
    assert (f0 > 0).any() and (f0 == 0).any()  # speech has voiced and unvoiced frames
    logmel, mrstft = LogMel(), tv_gen.MultiResolutionSTFTLoss()
    opt = torch.optim.AdamW(gen.parameters(), lr=2e-3)
    first = None
    for _ in range(25):
        loss, parts = tv_gen.generator_loss(gen, logmel, mrstft, batch, f0, bf16=True)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"mel_l1", "stft", "f0_l1", "v_bce"}
    with torch.no_grad():
        final, _ = tv_gen.generator_loss(gen, logmel, mrstft, batch, f0, bf16=False)
    assert float(final) < 0.8 * first


def test_cli_generator_stage_trains_exports_and_resumes(corpus, tmp_path):
    out, run = tmp_path / "voc", tmp_path / "run"
    argv = ["--stage", "generator", "--corpus", str(corpus), "--out", str(out), "--run-dir", str(run),
            "--minutes", "0.05", "--batch", "2", "--threads", "1"]
    assert tv.main(argv) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["generator"]["steps"] > 0
    steps = torch.load(run / "ckpt_generator.pt", weights_only=False)["step"]
    assert tv.main([*argv[:-6], "--minutes", "0.1", "--batch", "2", "--threads", "1"]) == 0
    assert torch.load(run / "ckpt_generator.pt", weights_only=False)["step"] > steps  # resumed, went on
    wav, sr = Vocoder.from_pretrained(out).decode([1, 2, 3, 4], voice="joe")
    assert sr == 24000 and wav.shape == (4 * 960,)


def test_cli_requires_a_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        tv.main(["--stage", "generator", "--corpus", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--run-dir", str(tmp_path / "r"), "--minutes", "0.01"])


def test_cli_mels_then_flow_stage(corpus, tmp_path):
    out, run = tmp_path / "voc", tmp_path / "run"
    common = ["--corpus", str(corpus), "--out", str(out), "--run-dir", str(run), "--threads", "1", "--batch", "2"]
    assert tv.main(["--stage", "mels", *common]) == 0
    mel_cache = torch.load(run / "mel_cache.pt", weights_only=False)
    assert len(mel_cache) == 3
    # warm-up on stand-in codes while the tokenizer is not trained yet: trains, exports nothing
    assert tv.main(["--stage", "flow", "--proxy-tokens", "--minutes", "0.03", "--flow-segment-tokens", "20",
                    *common]) == 0
    proxy = torch.load(run / "token_cache_proxy.pt", weights_only=False)
    assert set(proxy) == set(mel_cache) and all(int(t.max()) < 4096 for t in proxy.values())
    assert (run / "ckpt_flow_proxy.pt").exists() and not (out / "model.safetensors").exists()
    # the tokenizer is trained elsewhere; its tokens land in the cache the flow stage reads
    torch.save(tv_flow.build_token_cache(mel_cache, corpus, EnergyTokenizer()), run / "token_cache.pt")
    assert tv.main(["--stage", "flow", "--minutes", "0.05", "--flow-segment-tokens", "20", *common]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["flow"]["steps"] > 0 and info["flow"]["examples"] >= 3
    wav, sr = Vocoder.from_pretrained(out).decode([5, 6, 7, 8], voice="gb_female", pitch_st=2.0)
    assert wav.shape == (4 * 960,) and np.isfinite(wav).all()
    # fine-tuning into a new folder keeps the init's training history and adds the new run after it
    out2 = tmp_path / "voc2"
    assert tv.main(["--stage", "flow", "--minutes", "0.03", "--flow-segment-tokens", "20", "--init", str(out),
                    *[a if a != str(out) else str(out2) for a in common]]) == 0
    history = json.loads((out2 / "training.json").read_text())
    assert history["flow"] == info["flow"] and history["flow_2"]["steps"] > 0


def test_tokens_from_corpus_cache_and_added_encoder_transformers(corpus, tmp_path):
    """`--tokens-from-corpus` reads the semantic codes of the corpus' audio-token cache (no encoding) and
    `--cond-transformer-layers` grows the token encoder of an --init model: the new blocks start as the identity."""
    out, run = tmp_path / "voc", tmp_path / "run"
    common = ["--corpus", str(corpus), "--run-dir", str(run), "--threads", "1", "--batch", "2",
              "--flow-segment-tokens", "20"]
    assert tv.main(["--stage", "mels", "--out", str(out), *common]) == 0
    mel_cache = torch.load(run / "mel_cache.pt", weights_only=False)
    (corpus / "tokens").mkdir(exist_ok=True)
    semantic = {}
    for uid, item in mel_cache.items():
        semantic[uid] = EnergyTokenizer().encode(*load_audio(corpus / item["audio"])).semantic.numpy()
        if uid != "u2":  # one utterance without a cached file is left out
            np.savez(corpus / "tokens" / f"{uid}.npz", semantic=semantic[uid].astype(np.int16),
                     linguistic=np.zeros(1, np.int16))
    tokens = tv_flow.corpus_token_cache(mel_cache, corpus)
    assert set(tokens) == {"u0", "u1"}
    np.testing.assert_array_equal(tokens["u0"].numpy(), semantic["u0"])

    torch.manual_seed(0)
    base = Vocoder(FlowDecoder(small_flow_config()), Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2)))
    base.eval().save_pretrained(tmp_path / "init")
    before = Vocoder.from_pretrained(tmp_path / "init")
    grown = Vocoder.from_pretrained(tmp_path / "init")
    tv_flow.resize_cond_transformers(grown, 2)
    assert len(grown.flow.cond_transformers) == 2 and grown.flow.config.cond_transformer_layers == 2
    ids = list(range(200, 240))
    np.testing.assert_array_equal(grown.eval().decode(ids)[0], before.decode(ids)[0])

    assert tv.main(["--stage", "flow", "--tokens-from-corpus", "--cond-transformer-layers", "1", "--minutes", "0.03",
                    "--init", str(tmp_path / "init"), "--out", str(out), *common]) == 0
    trained = Vocoder.from_pretrained(out)
    assert trained.flow.config.cond_transformer_layers == 1
    assert set(torch.load(run / "token_cache.pt", weights_only=False)) == {"u0", "u1"}


def test_extend_mels_adds_the_rest_of_a_larger_pick(corpus, tmp_path):
    """`--extend-mels` adds the utterances a larger --max-hours pick holds and keeps the cached ones as they were;
    a symlinked cache (shared with another run) is replaced in this run dir, the shared file is left alone."""
    shared, run = tmp_path / "shared", tmp_path / "run"
    common = ["--stage", "mels", "--corpus", str(corpus), "--out", str(tmp_path / "voc"), "--threads", "1"]
    assert tv.main([*common, "--run-dir", str(shared), "--max-hours", "0.0001"]) == 0
    first = torch.load(shared / "mel_cache.pt", weights_only=False)
    assert len(first) == 1
    run.mkdir()
    (run / "mel_cache.pt").symlink_to(shared / "mel_cache.pt")
    assert tv.main([*common, "--run-dir", str(run), "--max-hours", "1", "--extend-mels"]) == 0
    grown = torch.load(run / "mel_cache.pt", weights_only=False)
    assert set(grown) == {"u0", "u1", "u2"} and not (run / "mel_cache.pt").is_symlink()
    (uid,) = first
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first[uid]["mels"], grown[uid]["mels"]))
    assert set(torch.load(shared / "mel_cache.pt", weights_only=False)) == {uid}  # the shared cache is untouched


def test_voice_swap_copies_render_a_sibling_voice(corpus):
    """Voices derived from one engine output (joe, joe_low, joe_high) get parallel copies: same tokens and duration,
    the sibling's pitch and formants, labelled with the voice they now have and how far PSOLA got from its pitch."""
    from npc_server.voices import VOICE_BANK

    assert {v.id for v in tv_data.sibling_voices("joe")} == {"joe_low", "joe_high"}
    assert tv_data.sibling_voices("gb_female") == [] and tv_data.sibling_voices("player_007") == []
    wav, sr = load_audio(corpus / "audio" / "u1.wav")  # a ~100 Hz male voice standing in for joe
    up, label = tv_data.render_as_sibling(wav, sr, VOICE_BANK["joe"], VOICE_BANK["joe_high"])
    assert len(up) == len(wav) and abs(label) < 1.0
    assert abs(tv_data.measured_shift_st(wav, up, sr) - 4.0) < 1.0

    cfg = small_flow_config()
    logmel = LogMel(MelConfig())
    mel = logmel(torch.from_numpy(resample(wav, sr, 24000)))[0].half()
    cache = {"u1": {"speaker": "joe", "audio": "audio/u1.wav", "mels": [(mel, 0.0)]},
             "u0": {"speaker": "gb_female", "audio": "audio/u0.wav", "mels": [(mel, 0.0)]}}
    assert tv_data.add_voice_swaps(cache, corpus, MelConfig(), prob=1.0, seed=0) == 1
    assert tv_data.add_voice_swaps(cache, corpus, MelConfig(), prob=1.0, seed=0) == 0  # already has its copy
    (_, st, sibling) = cache["u1"]["mels"][1]
    assert sibling in ("joe_low", "joe_high") and abs(st) < 1.5
    tokens = {"u1": torch.arange(mel.shape[-1] // 4, dtype=torch.int16)}
    examples = tv_flow.join_caches(cache, tokens, cfg)
    assert [cfg.voices[ex.voice] for ex in examples] == ["joe", sibling]
    assert torch.equal(examples[0].tokens, examples[1].tokens)


def test_cli_rejects_a_voice_swap_outside_0_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        tv.main(["--stage", "mels", "--voice-swap", "1.5", "--run-dir", str(tmp_path / "r")])
    assert err.value.code == 2 and "--voice-swap" in capsys.readouterr().err


def _constant_f0_generator(hz: float, voiced: bool = True) -> Generator:
    """A tiny generator whose F0 predictor hears `hz` in every frame (or nothing when not `voiced`)."""
    gen = Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2))
    with torch.no_grad():
        gen.f0_predictor.out.weight.zero_()
        gen.f0_predictor.out.bias.copy_(torch.tensor([np.log(hz / 150.0), 10.0 if voiced else -10.0]))
    return gen


@pytest.mark.parametrize("value", ["-0.1", "1.0"])
def test_cli_rejects_a_cond_dropout_outside_0_1(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tv.main(["--stage", "flow", "--cond-dropout", value, "--run-dir", str(tmp_path)])
    assert exc.value.code == 2 and "--cond-dropout" in capsys.readouterr().err


def test_voice_pitch_reference_labels(corpus):
    """`pitch_reference` "voice": a speaker's reference F0 takes out the shift the corpus asked for (persona pitch +
    emotion), and each example's pitch input is its mel's median F0 in semitones from its speaker's reference."""
    rows = {r["id"]: r for r in read_manifest(corpus)}
    mel_cache = tv_data.build_mel_cache(list(rows.values()), corpus, MelConfig(), pitch_aug=0.0, seed=0)
    tokens = tv_flow.build_token_cache(mel_cache, corpus, EnergyTokenizer())
    cfg = small_flow_config()
    cfg.pitch_reference = "voice"
    gen = _constant_f0_generator(200.0)
    rows["u0"] = {**rows["u0"], "controls": {"emotion": "happy", "speed": 1.0, "pitch_st": 2.0}}  # 2 + 2 st asked
    ref = tv_flow.speaker_f0_table(mel_cache, rows, gen)
    assert ref == pytest.approx({"gb_female": 200.0 * 2 ** (-4 / 12), "scot_male": 200.0, "player_007": 200.0},
                                abs=0.01)
    examples = {ex.voice: ex.pitch_st for ex in tv_flow.join_caches(mel_cache, tokens, cfg, gen, ref)}
    assert examples == pytest.approx({cfg.voices.index("gb_female"): 4.0, cfg.voices.index("scot_male"): 0.0,
                                      cfg.voices.index("<other>"): 0.0}, abs=1e-3)
    assert tv_flow.join_caches(mel_cache, tokens, cfg, _constant_f0_generator(200.0, voiced=False), ref) == []
    assert len(tv_flow.join_caches(mel_cache, tokens, cfg, gen, {"scot_male": 100.0})) == 1  # no reference: left out
    with pytest.raises(ValueError, match="needs the generator"):
        tv_flow.join_caches(mel_cache, tokens, cfg)


def test_cli_flow_stage_with_voice_pitch_reference(corpus, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    common = ["--corpus", str(corpus), "--run-dir", str(run), "--threads", "1", "--batch", "2"]
    assert tv.main(["--stage", "mels", *common]) == 0
    torch.save(tv_flow.build_token_cache(torch.load(run / "mel_cache.pt", weights_only=False), corpus, EnergyTokenizer()),
               run / "token_cache.pt")
    Vocoder(FlowDecoder(small_flow_config()), _constant_f0_generator(120.0)).eval().save_pretrained(tmp_path / "init")
    assert tv.main(["--stage", "flow", "--pitch-reference", "voice", "--minutes", "0.03", "--flow-segment-tokens", "20",
                    "--cond-dropout", "0.2", "--init", str(tmp_path / "init"), "--out", str(out), *common]) == 0
    trained = Vocoder.from_pretrained(out)
    assert trained.flow.config.pitch_reference == "voice"
    assert trained.flow.config.cond_dropout == 0.2 and trained.flow.config.guidance == 0.0
    assert json.loads((out / "training.json").read_text())["flow"]["cond_dropout"] == 0.2
    trained.flow.set_sampling(guidance=1.0)  # allowed now that the flow has seen examples without tokens
    assert trained.flow.config.voice_f0_hz == pytest.approx({"gb_female": 120.0, "scot_male": 120.0}, abs=0.5)
    assert json.loads((out / "training.json").read_text())["flow"]["pitch_reference"] == "voice"
    assert np.isfinite(trained.decode(list(range(30)), voice="scot_male", pitch_st=-3.0)[0]).all()


def test_generator_fine_tunes_on_flow_mels(corpus, tmp_path):
    """`--stage generator --flow-mels`: the generator learns from the flow's mels of the NPC utterances' cached tokens
    (in their own voices) against their recordings; the flow is left as it was, and without cached tokens the stage
    says what it needs."""
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    shutil.rmtree(root / "tokens", ignore_errors=True)
    init, out = tmp_path / "init", tmp_path / "out"
    torch.manual_seed(0)
    Vocoder(FlowDecoder(small_flow_config()), Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2))
            ).eval().save_pretrained(init)
    common = ["--stage", "generator", "--flow-mels", "--init", str(init), "--out", str(out), "--corpus", str(root),
              "--run-dir", str(tmp_path / "run"), "--minutes", "0.02", "--batch", "2", "--gen-segment", "0.3",
              "--threads", "1", "--precision", "fp32"]
    with pytest.raises(SystemExit, match="cached tokens"):
        tv.main(common)
    with pytest.raises(SystemExit) as exc:
        tv.main(["--stage", "all", "--flow-mels", "--run-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    (root / "tokens").mkdir()
    rows = [r for r in read_manifest(root) if r["role"] == "npc"]
    for r in rows:
        codes = EnergyTokenizer().encode(*load_audio(root / r["audio"])).semantic.numpy()
        np.savez(root / "tokens" / f"{r['id']}.npz", semantic=codes.astype(np.int16))
    before = Vocoder.from_pretrained(init)
    mels = tv_gen.flow_mels(before, rows, root)
    assert [m.shape[-1] for m in mels] == [4 * len(np.load(root / "tokens" / f"{r['id']}.npz")["semantic"])
                                           for r in rows]
    assert tv.main(common) == 0
    info = json.loads((out / "training.json").read_text())["generator"]
    assert info["flow_mels"] is True and info["files"] == len(rows) == 2 and info["steps"] > 0
    trained = Vocoder.from_pretrained(out)
    same = {name: torch.equal(a, b) for (name, a), b in zip(before.state_dict().items(), trained.state_dict().values())}
    assert all(v for k, v in same.items() if k.startswith("flow."))
    assert not all(v for k, v in same.items() if k.startswith("generator."))
