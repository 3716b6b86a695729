"""Where the flow loses the phones: the mel phone judge's error rate on real mels, the flow's prior mean and its samples.

For NPC utterances of the held-out split (valid when there is none) and of the training pick (the mel stage's pick, default seed), the
semantic tokens come from the corpus token cache (<corpus>/tokens/<id>.npz, the shipped tokenizer's) and the judge
(`npc-server train vocoder --stage judge`) reads, per utterance:
  real   the log-mel of the source audio (the judge's own floor)
  prior  the flow's token-conditioned prior mean mu alone (no flow steps)
  S:T    the flow sampled with S Euler steps at noise temperature T
  S:T:W  the same with classifier-free guidance scale W (a flow trained with `--cond-dropout`); S:T:W:G guides the
         first G steps only, S:T:W:Gc carries the last guided step's term on (as in benchmarks/vocoder_speed.py)
A gap between prior and samples is the flow's; a gap between held-out and train says more data would help.

    python -m benchmarks.flow_diagnosis --vocoder models/default/vocoder --judge runs/phone_judge --n 60 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.vocoder_speed import parse_setting
from npc_server.paths import DEFAULT_MODEL_DIR, data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocoder", type=Path, default=DEFAULT_MODEL_DIR / "vocoder")
    ap.add_argument("--judge", type=Path, required=True, help="mel phone judge directory")
    ap.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    ap.add_argument("--n", type=int, default=60, help="utterances per split")
    ap.add_argument("--settings", nargs="+", default=["3:0.667", "3:0.0", "10:0.667"],
                    help="S:T[:W[:G[c]]] flow settings (see above)")
    ap.add_argument("--splits", nargs="+", default=["heldout", "train"], choices=["heldout", "train"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        settings = {s: parse_setting(s) for s in args.settings}
    except ValueError as e:
        ap.error(str(e))

    from tqdm import tqdm

    from npc_server.audio import load_audio, resample
    from npc_server.eval.metrics import heldout_rows, judge_phone_error_rate
    from npc_server.eval.vocoder_eval import _voice_for
    from npc_server.tokenizer.phones import PhoneInventory
    from npc_server.training.corpus.manifest import read_manifest
    from npc_server.training.train_vocoder.data import pick_utterances
    from npc_server.vocoder import Vocoder
    from npc_server.vocoder.mel import LogMel
    from npc_server.vocoder.phone_judge import PhoneJudge

    torch.set_num_threads(args.threads)
    vocoder = Vocoder.from_pretrained(args.vocoder)
    judge = PhoneJudge.from_pretrained(args.judge)
    inventory = PhoneInventory(judge.config.phones)
    logmel = LogMel(vocoder.mel_config)
    flow, fpt = vocoder.flow, vocoder.flow.config.frames_per_token
    for name, kwargs in settings.items():  # check them before the long loop
        try:
            flow.set_sampling(**kwargs)
        except ValueError as e:
            ap.error(f"setting {name}: {e}")

    def cached(rows: list[dict]) -> list[dict]:
        return [r for r in rows if (args.corpus / "tokens" / f"{r['id']}.npz").is_file()]

    picks = {}
    if "heldout" in args.splits:
        picks["heldout"] = cached(heldout_rows(args.corpus, 10 * args.n, args.seed))[:args.n]
    if "train" in args.splits:
        train = [r for r in pick_utterances(read_manifest(args.corpus), "train", 4.0, 0)
                 if r["role"] == "npc" and r["language"] == "en"]
        picks["train"] = cached(train)[:args.n]

    results = {}
    for split, rows in picks.items():
        mels: dict[str, list[torch.Tensor]] = {"real": [], "prior": [], **{name: [] for name in settings}}
        refs = []
        t0 = time.perf_counter()
        for r in tqdm(rows, desc=split, unit="utt"):
            with np.load(args.corpus / "tokens" / f"{r['id']}.npz") as z:
                tokens = torch.from_numpy(z["semantic"].astype(np.int64))[None]
            wav, sr = load_audio(args.corpus / r["audio"])
            with torch.no_grad():
                real = logmel(torch.from_numpy(resample(wav, sr, vocoder.sample_rate)))[0]
                n = min(real.shape[-1] // fpt, tokens.shape[1])
                tokens, real = tokens[:, :n], real[:, :n * fpt]
                voice = torch.tensor([flow.voice_index(_voice_for(vocoder, r["speaker"]))])
                pitch = torch.zeros(1)
                _, mu = flow.encode_tokens(tokens, flow.global_condition(voice, pitch))
                mels["prior"].append((flow.unpair_frames(mu) * flow.config.mel_std + flow.config.mel_mean)[0])
                noise = vocoder.noise(0, n * fpt)
                for name, kwargs in settings.items():
                    flow.set_sampling(**kwargs)
                    mels[name].append(flow.sample(tokens, voice, pitch, noise)[0])
            mels["real"].append(real)
            refs.append(inventory.encode(r.get("phonemes", "")))
        with torch.no_grad():
            results[split] = {k: judge_phone_error_rate(judge, v, refs) for k, v in mels.items()}
        results[split]["utterances"] = len(rows)
        print(f"{split} ({len(rows)} utterances, {time.perf_counter() - t0:.0f} s): judge PER "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in results[split].items() if k != "utterances"), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"vocoder": str(args.vocoder), "judge": str(args.judge), **results}, indent=2))


if __name__ == "__main__":
    main()
