"""Listening WER of backbone v2: its ASR-task transcript of audio tokens vs the words that were spoken.

Used by `npc-server train hearing` after each run and by `npc-server eval listen` for v2 backbones, on corpus
held-out questions (unseen voices) and on real human recordings (`--real`: Debian's pocketsphinx-testdata).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.backbone.audio_lm import AudioLM
from npc_server.backbone.template_v2 import HearingFormat
from npc_server.backbone.thinker import DecodeOptions, ThinkerSession, decode
from npc_server.eval.metrics import normalize_text, word_errors

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")


def transcribe(model: AudioLM, fmt: HearingFormat, audio_ids: list[int], max_new_tokens: int = 48) -> str:
    session = ThinkerSession(model)
    session.prefill(fmt.asr_prompt(audio_ids))
    text_rows = [int(i) for i in model.head_ids.tolist() if i < model.cfg.n_text]
    out = decode(session, text_rows + [fmt.text_end], {fmt.text_end}, DecodeOptions(max_new_tokens=max_new_tokens))
    return fmt.text.decode([i for i in out if i < model.cfg.n_text], skip_special_tokens=True).strip()


@torch.inference_mode()
def listen_wer(model: AudioLM, fmt: HearingFormat, rows: list[dict], progress: bool = True) -> dict:
    """rows: dicts with text, linguistic (and interleaved) codes -> {"wer", "n", "exact", "results"}."""
    errors = words = exact = 0
    results = []
    for r in tqdm(rows, desc="listen", unit="utt", disable=not progress):
        hyp = transcribe(model, fmt, fmt.audio(r["linguistic"], r.get("interleaved")))
        ref_w, hyp_w = normalize_text(r["text"]), normalize_text(hyp)
        e = word_errors(ref_w, hyp_w)
        errors, words, exact = errors + e, words + len(ref_w), exact + (ref_w == hyp_w)
        results.append({"id": r.get("id", ""), "text": r["text"], "transcript": hyp, "word_errors": e})
    return {"wer": errors / max(1, words), "n": len(rows), "words": words, "exact": exact / max(1, len(rows)),
            "results": results}


def real_recordings() -> list[dict]:
    """Human English recordings with their transcripts from Debian's pocketsphinx-testdata (apt install
    pocketsphinx-testdata): 5 LibriVox sentences, 5 card names, "go forward ten meters", one TIDIGITS string."""
    import soundfile as sf

    if not POCKETSPHINX.is_dir():
        raise FileNotFoundError(f"{POCKETSPHINX} is missing: apt-get install pocketsphinx-testdata")
    out = []
    for folder in ("librivox", "cards"):
        trans = (POCKETSPHINX / folder / ("transcription" if folder == "librivox" else "cards.transcription")).read_text()
        for line in trans.splitlines():
            if "(" not in line:
                continue
            text, uid = line.rsplit("(", 1)
            wav = POCKETSPHINX / folder / f"{uid.strip(') ')}.wav"
            if wav.is_file():
                audio, sr = sf.read(str(wav), dtype="float32")
                out.append({"id": f"{folder}/{wav.stem}", "text": text.replace("<s>", "").replace("</s>", "").strip(),
                            "audio": audio, "sr": sr})
    for name, text in (("goforward.raw", "go forward ten meters"), ("tidigits/dhd.2934z.raw", "two nine three four zero")):
        path = POCKETSPHINX / name
        if path.is_file():
            pcm = np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
            out.append({"id": name, "text": text, "audio": pcm, "sr": 16000})
    return out


def run(args, models: dict[str, str]) -> int:
    """`npc-server eval listen` for v2 backbones: question audio encoded by the v2 tokenizer as served."""
    import json

    from npc_server.audio.io import load_audio
    from npc_server.backbone.audio_lm import load_text_tokenizer
    from npc_server.tokenizer.tokenizer_v2 import load_tokenizer

    tokenizer = load_tokenizer(args.audio_tokenizer)
    if getattr(tokenizer, "version", 1) != 2:
        raise SystemExit(f"{args.audio_tokenizer} is not a v2 tokenizer; pass --audio-tokenizer models/default/tokenizer_v2")
    if args.real:
        rows, where = real_recordings(), "real human recordings (pocketsphinx-testdata)"
        sounds = {r["id"]: (r["audio"], r["sr"]) for r in rows}
    else:
        from npc_server.eval.listen_eval import question_rows

        corpus, rows = question_rows(args)
        where = f"{args.split} {args.role} utterances of {corpus}"
        sounds = {r["id"]: load_audio(corpus / r["audio"]) for r in rows}
    for r in rows:
        toks = tokenizer.encode(*sounds[r["id"]])
        r.update(linguistic=toks.linguistic.numpy(), interleaved=toks.interleaved.numpy())
        r.pop("audio", None)
    report = {"data": where, "models": {}}
    for name, path in models.items():
        model = AudioLM.from_pretrained(path)
        text_tok = load_text_tokenizer(model.cfg.base)
        if args.open_vocab:
            from npc_server.training.lm_v2 import common_text_ids

            model.set_head(torch.cat([model.head_text_ids(), torch.tensor(common_text_ids(text_tok, args.open_vocab))]))
            print(f"{name}: {model.head_ids.numel()} output rows with the open vocabulary")
        fmt = HearingFormat(model.cfg.layout, text_tok, model.cfg.audio_input)
        res = listen_wer(model, fmt, rows)
        report["models"][name] = res
        print(f"{name}: WER {res['wer']:.1%} over {res['n']} {where} ({res['words']} words), exact transcripts "
              f"{res['exact']:.1%}")
        for item in res["results"][:3]:
            print(f"  said: {item['text']!r}\n  heard: {item['transcript']!r}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return 0
