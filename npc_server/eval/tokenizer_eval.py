"""`npc-server eval tokenizer`: PER of the linguistic-code readout, codebook usage, encode RTF, speaker invariance."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from npc_server.audio.io import load_audio
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir, require_corpus
from npc_server.tokenizer.phones import edit_distance
from npc_server.tokenizer.quantizers import codebook_usage
from npc_server.tokenizer.tokenizer import AudioTokenizer
from npc_server.training.corpus.manifest import read_manifest


def _collapse(seq: list[int]) -> list[int]:
    return [x for i, x in enumerate(seq) if i == 0 or x != seq[i - 1]]


def agreement(a: list[int], b: list[int]) -> float:
    """1 - normalised edit distance (1 = identical sequences)."""
    if not a and not b:
        return 1.0
    return 1.0 - edit_distance(a, b) / max(len(a), len(b))


def select_rows(rows: list[dict], split: str, limit: int, seed: int) -> tuple[list[dict], list[tuple[int, int]], str]:
    """Rows of `split` (at most `limit`), preferring texts said by 2+ voices, and the same-text voice pairs."""
    rng = random.Random(seed)
    pool = [r for r in rows if r.get("split") == split]
    if not pool:
        raise SystemExit(f"no {split!r} utterances in the manifest")
    pair_split = split
    groups = defaultdict(list)
    for r in pool:
        groups[(r.get("language"), r.get("text"))].append(r)
    multi = [g for g in groups.values() if len({r["speaker"] for r in g}) >= 2]
    if not multi:  # fall back to any split for the invariance pairs
        pair_split = "all"
        groups = defaultdict(list)
        for r in rows:
            groups[(r.get("language"), r.get("text"))].append(r)
        multi = [g for g in groups.values() if len({r["speaker"] for r in g}) >= 2]
    rng.shuffle(multi)
    chosen, seen = [], set()
    pairs = []
    for g in multi[: max(1, limit // 4)]:
        a = g[0]
        b = next(r for r in g[1:] if r["speaker"] != a["speaker"])
        for r in (a, b):
            if r["id"] not in seen:
                seen.add(r["id"])
                chosen.append(r)
        pairs.append((a["id"], b["id"]))
    rest = [r for r in pool if r["id"] not in seen]
    rng.shuffle(rest)
    chosen += rest[: max(0, limit - len(chosen))]
    return chosen, pairs, pair_split


def evaluate(model: AudioTokenizer, corpus: Path, rows: list[dict], split: str, pairs, show: bool = True) -> dict:
    inv = model.inventory
    toks, phones_hyp = {}, {}
    errs = ref_total = oov = 0
    audio_s = enc_s = 0.0
    by_lang = defaultdict(lambda: [0, 0])
    by_role = defaultdict(lambda: [0, 0])
    per_rows = 0
    for r in tqdm(rows, desc="eval tokenizer", unit="utt", disable=not show):
        wav, sr = load_audio(corpus / r["audio"])
        t0 = time.perf_counter()
        tok = model.encode(wav, sr)
        enc_s += time.perf_counter() - t0
        audio_s += len(wav) / sr
        toks[r["id"]] = tok
        hyp = [inv.index[p] for p in model.phones_from_tokens(tok.linguistic)]
        phones_hyp[r["id"]] = hyp
        if r.get("split") == split:
            ref = inv.encode(r.get("phonemes", ""))
            from npc_server.tokenizer.phones import split_phones

            oov += sum(1 for u in split_phones(r.get("phonemes", "")) if u not in inv.index)
            e = edit_distance(hyp, ref)
            errs += e
            ref_total += len(ref)
            by_lang[r.get("language", "?")][0] += e
            by_lang[r.get("language", "?")][1] += len(ref)
            by_role[r.get("role", "?")][0] += e
            by_role[r.get("role", "?")][1] += len(ref)
            per_rows += 1
    split_ids = [r["id"] for r in rows if r.get("split") == split]
    ling = torch.cat([toks[i].linguistic for i in split_ids])
    sem = torch.cat([toks[i].semantic for i in split_ids])
    inv_l, inv_lc, inv_p, inv_s = [], [], [], []
    for a, b in pairs:
        la, lb = toks[a].linguistic.tolist(), toks[b].linguistic.tolist()
        inv_l.append(agreement(la, lb))
        inv_lc.append(agreement(_collapse(la), _collapse(lb)))
        inv_p.append(agreement(phones_hyp[a], phones_hyp[b]))
        inv_s.append(agreement(toks[a].semantic.tolist(), toks[b].semantic.tolist()))
    # chance level: the same measure on pairs of different texts
    rng = random.Random(0)
    ids = list(toks)
    base = []
    for _ in range(len(pairs)):
        a, b = rng.sample(ids, 2)
        base.append(agreement(toks[a].linguistic.tolist(), toks[b].linguistic.tolist()))

    def mean(x):
        return round(sum(x) / len(x), 4) if x else None

    return {
        "split": split,
        "utterances": per_rows,
        "audio_hours": round(audio_s / 3600, 3),
        "per": round(errs / max(1, ref_total), 4),
        "per_by_language": {k: round(v[0] / max(1, v[1]), 4) for k, v in sorted(by_lang.items())},
        # in the corpus' heldout split the players' voices are unseen; the NPCs speak in voice-bank voices
        "per_by_role": {k: round(v[0] / max(1, v[1]), 4) for k, v in sorted(by_role.items())},
        "ref_phones": ref_total,
        "oov_phone_units": oov,
        "usage": {"linguistic": codebook_usage(ling, 1024), "semantic": codebook_usage(sem, 4096)},
        "rtf": round(enc_s / max(audio_s, 1e-9), 5),
        "speaker_invariance": {
            "pairs": len(pairs),
            "pairs_from_split": None,
            "linguistic_agreement": mean(inv_l),
            "linguistic_agreement_collapsed": mean(inv_lc),
            "readout_phone_agreement": mean(inv_p),
            "semantic_agreement": mean(inv_s),
            "different_text_baseline": mean(base),
        },
    }


def format_table(res: dict) -> str:
    u, si = res["usage"], res["speaker_invariance"]
    lines = [
        f"tokenizer eval on {res['split']!r}: {res['utterances']} utterances, {res['audio_hours']} h, "
        f"threads={res.get('threads')}, machine load {res.get('load_average_1min')}",
        f"{'metric':<46}{'value':>12}   target",
        f"{'phone error rate (CTC readout of ling. codes)':<46}{res['per']:>12.2%}   < 15%",
        f"{'linguistic codes used (of 1024)':<46}{u['linguistic']['used_fraction']:>12.2%}   >= 60%",
        f"{'linguistic perplexity':<46}{u['linguistic']['perplexity']:>12.1f}",
        f"{'semantic codes used (of 4096)':<46}{u['semantic']['used_fraction']:>12.2%}   >= 60%",
        f"{'semantic perplexity':<46}{u['semantic']['perplexity']:>12.1f}",
        f"{'encode real-time factor':<46}{res['rtf']:>12.4f}   < 0.02",
        f"{'same text, 2 voices: ling. token agreement':<46}{si['linguistic_agreement'] or 0:>12.2%}   ({si['pairs']} pairs, {si['pairs_from_split']})",
        f"{'  ... collapsed repeats':<46}{si['linguistic_agreement_collapsed'] or 0:>12.2%}",
        f"{'  ... readout phones':<46}{si['readout_phone_agreement'] or 0:>12.2%}",
        f"{'  ... semantic tokens':<46}{si['semantic_agreement'] or 0:>12.2%}",
        f"{'  different texts (chance level), ling.':<46}{si['different_text_baseline'] or 0:>12.2%}",
    ]
    for lang, per in res["per_by_language"].items():
        lines.append(f"{'  PER ' + lang:<46}{per:>12.2%}")
    role_note = {"player": "player voices (unseen in heldout)", "npc": "NPC voices (voice bank)"}
    for role, per in res.get("per_by_role", {}).items():
        lines.append(f"{'  PER ' + role_note.get(role, role):<46}{per:>12.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="npc-server eval tokenizer", description=__doc__)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer")
    p.add_argument("--split", default="heldout", help="manifest split to evaluate (heldout = unseen voices)")
    p.add_argument("--limit", type=int, default=800, help="at most this many utterances")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "tokenizer_eval.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = require_corpus(args.corpus, "eval tokenizer")
    model = AudioTokenizer.from_pretrained(args.model)
    rows = read_manifest(corpus)
    chosen, pairs, pair_split = select_rows(rows, args.split, args.limit, args.seed)
    res = evaluate(model, corpus, chosen, args.split, pairs)
    res["speaker_invariance"]["pairs_from_split"] = pair_split
    res.update(load_average_1min=round(os.getloadavg()[0], 2), threads=args.threads, model=str(args.model), corpus=str(corpus), params=model.num_parameters(),
               encoder_params=model.num_parameters(True))
    print(format_table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
