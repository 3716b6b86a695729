"""Speculative audio decoding: draft acceptance rate and decode speedup on held-out prompts, plus a cost model.

    python -m benchmarks.speculative --backbone models/default/backbone --draft models/default/draft --corpus C \
        --k 2,3,4 --min-prob 0,0.5
    python -m benchmarks.speculative --tiny /tmp/spec_tiny      # trains a small backbone + a draft first (~8 min)

Prompts: the held-out spoken questions of a corpus (`--corpus`: audio ids from its token cache, persona and
controls as in SFT; earlier turns of multi-turn rows are left out), else typed questions. Each prompt is answered
without and with the draft, alternately, in fresh sessions; tokens/s count all generated tokens (text and audio).
The cost model times one backbone pass (1 and k+1 tokens) and one draft pass on this machine and projects the
speedup of an audio span at a given acceptance rate (independent acceptances assumed): compare it with the
measured figure to see what a better draft would buy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from npc_server.backbone.generator import SPECULATIVE_FILE, Generator, SamplingConfig, forward_tokens
from npc_server.backbone.speculative import SpeculativeDecoder
from npc_server.backbone.template import SystemPrompt, UserTurn
from npc_server.bench import QUESTIONS, speculative_figures
from npc_server.controls import Controls


def corpus_prompts(corpus: Path, n: int, personas: Path | None) -> list[tuple[SystemPrompt, UserTurn]]:
    from npc_server.training.lm_data import TokenCache, dialogue_prompt, load_dialogues, persona_infos

    tokens = corpus / "tokens" if (corpus / "tokens").is_dir() else corpus / "tokens_synthetic"
    cache = TokenCache(tokens)
    infos = persona_infos(personas)
    out = []
    for row in load_dialogues(corpus, "heldout"):
        if row["question_audio_id"] in cache and row["category"] != "multiturn":
            system, override = dialogue_prompt(row, infos)
            out.append((system, UserTurn(audio=cache.get(row["question_audio_id"])["interleaved"], controls=override)))
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no held-out dialogue of {corpus} has its question in the token cache {tokens}")
    return out


def typed_prompts(n: int) -> list[tuple[SystemPrompt, UserTurn]]:
    system = SystemPrompt("innkeeper", "You are Greta, the innkeeper of The Sleepy Otter.", Controls())
    return [(system, UserTurn(text=text)) for _, text in QUESTIONS[:n]]


def build_tiny(work: Path, pretrain_steps: int = 200, sft_steps: int = 300, draft_steps: int = 300
               ) -> tuple[Path, Path, Path]:
    """A synthetic corpus, a `small` backbone (pretrain + SFT) and a `draft`-preset draft distilled from it, cached
    in `work` (~8 min on one core)."""
    from npc_server.training import draft, pretrain, sft
    from npc_server.training.lm_synthetic import synthetic_corpus

    corpus = work / "corpus"
    if not (corpus / "manifest.jsonl").is_file():
        synthetic_corpus(corpus, n_dialogues=80, seed=1)
    common = ["--corpus", str(corpus), "--synthetic-tokens", "--log-every", "50", "--threads", "1"]
    if not (work / "pretrain" / "model").is_dir():
        pretrain.main(common + ["--preset", "small", "--text-vocab", "512", "--out", str(work / "pretrain"),
                                "--steps", str(pretrain_steps), "--batch-size", "8"])
    if not (work / "backbone" / "model").is_dir():
        sft.main(common + ["--init", str(work / "pretrain" / "model"), "--out", str(work / "backbone"),
                           "--steps", str(sft_steps), "--batch-size", "8", "--lr", "1e-3"])
    if not (work / "draft" / "model").is_dir():
        draft.main(common + ["--init-target", str(work / "backbone" / "model"), "--preset", "draft",
                             "--out", str(work / "draft"), "--steps", str(draft_steps), "--batch-size", "8"])
    return work / "backbone" / "model", work / "draft" / "model", corpus


def pass_times_ms(runs: list[tuple[torch.nn.Module, int]], context: int = 300, repeats: int = 40) -> list[float]:
    """Median time of one cached forward pass of (model, n_tokens) each, measured interleaved so that a change of
    machine load hits them all alike."""
    caches = []
    for model, _ in runs:
        device = next(model.parameters()).device
        _, cache = forward_tokens(model, DynamicCache(config=model.config), [5] * context, device, last_only=True)
        caches.append((cache, device))
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, ((model, n), (cache, device)) in enumerate(zip(runs, caches)):
            t = time.perf_counter()
            forward_tokens(model, cache, [7] * n, device, last_only=(n == 1))
            times[i].append(time.perf_counter() - t)
            cache.crop(-n)
    return [sorted(t)[len(t) // 2] * 1000 for t in times]


def cost_model(generator: Generator) -> dict:
    k = generator.speculative.k
    one, verify, draft = pass_times_ms([(generator.model, 1), (generator.model, k + 1),
                                        (generator.speculative.model, 1)])
    projected = {}
    for alpha in (0.3, 0.5, 0.7, 0.9):
        # a round of k proposals emits the accepted ones + 1 (independent acceptances with probability alpha)
        per_round = sum(alpha ** i for i in range(k + 1))
        projected[alpha] = per_round * one / (verify + k * draft)
    return {"backbone_pass_ms": one, f"backbone_pass_{k + 1}_tokens_ms": verify, "draft_pass_ms": draft,
            "projected_audio_speedup": projected}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", type=Path, default=None)
    ap.add_argument("--draft", type=Path, default=None)
    ap.add_argument("--corpus", type=Path, default=None, help="take held-out spoken questions from this corpus")
    ap.add_argument("--personas", type=Path, default=None)
    ap.add_argument("--tiny", type=Path, default=None, help="work folder for a tiny trained backbone + draft")
    ap.add_argument("--n", type=int, default=6, help="prompts")
    ap.add_argument("--k", default="2", help="draft tokens per round (comma-separated to compare)")
    ap.add_argument("--min-prob", default="0", help="stop proposing below this draft probability (comma-separated)")
    ap.add_argument("--temperatures", default="0,0.7", help="comma-separated; 0 = greedy (the engine default)")
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save-best", action="store_true",
                    help="write the fastest greedy (k, min_prob) to <draft>/speculative.json (read by the server)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        args.backbone, args.draft, tiny_corpus = build_tiny(args.tiny)
        args.corpus = args.corpus or tiny_corpus
    if not (args.backbone and args.draft):
        ap.error("give --backbone and --draft, or --tiny WORKDIR")
    gen = Generator.from_pretrained(args.backbone, draft=args.draft)
    draft_model = gen.speculative.model
    prompts = corpus_prompts(args.corpus, args.n, args.personas) if args.corpus else typed_prompts(args.n)
    results = {"backbone": str(args.backbone), "draft": str(args.draft), "threads": args.threads,
               "prompts": len(prompts), "runs": []}
    print(f"backbone {args.backbone}  draft {args.draft}  {len(prompts)} prompts  {args.threads} thread(s)")
    print(f"{'temperature':>11} {'k':>2} {'min_prob':>8} {'acceptance':>10} {'tok/s plain':>12} {'tok/s spec':>11} "
          f"{'speedup':>8} {'passes plain/spec':>18} {'greedy same':>11}")
    for temp in [float(t) for t in args.temperatures.split(",") if t]:
        for k in [int(x) for x in args.k.split(",") if x]:
            for min_prob in [float(x) for x in args.min_prob.split(",") if x]:
                gen.speculative = SpeculativeDecoder(draft_model, k, min_prob)
                sampling = SamplingConfig(temperature=temp, max_new_tokens=args.max_new_tokens, seed=0)
                r = speculative_figures(gen, prompts, sampling)
                r["min_prob"] = min_prob
                results["runs"].append(r)
                same = "-" if r["greedy_identical"] is None else ("yes" if r["greedy_identical"] else "NO")
                print(f"{temp:>11.2f} {k:>2} {min_prob:>8.2f} {r['acceptance_rate']:>10.2f} "
                      f"{r['tokens_per_s_plain']:>12.0f} {r['tokens_per_s_speculative']:>11.0f} {r['speedup']:>7.2f}x "
                      f"{r['backbone_passes_plain']:>8} / {r['backbone_passes_speculative']:<7} {same:>11}")
    results["cost_model"] = {}
    for k in [int(x) for x in args.k.split(",") if x]:
        gen.speculative = SpeculativeDecoder(draft_model, k)
        cm = results["cost_model"][k] = cost_model(gen)
        print(f"cost k={k}: backbone pass {cm['backbone_pass_ms']:.2f} ms (1 token), "
              f"{cm[f'backbone_pass_{k + 1}_tokens_ms']:.2f} ms ({k + 1} tokens); draft pass "
              f"{cm['draft_pass_ms']:.2f} ms; projected audio-span speedup at acceptance " + ", ".join(
                  f"{a:.1f}: {s:.2f}x" for a, s in cm["projected_audio_speedup"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    greedy = [r for r in results["runs"] if r["temperature"] == 0]
    if args.save_best and greedy:
        best = max(greedy, key=lambda r: r["speedup"])
        (Path(args.draft) / SPECULATIVE_FILE).write_text(json.dumps(
            {"k": best["draft_k"], "min_prob": best["min_prob"], "measured_speedup": best["speedup"],
             "acceptance_rate": best["acceptance_rate"]}, indent=2) + "\n")
        print(f"wrote {Path(args.draft) / SPECULATIVE_FILE}: k={best['draft_k']} min_prob={best['min_prob']} "
              f"({best['speedup']:.2f}x)" + ("  -- slower than plain decoding: do not ship this draft"
                                              if best["speedup"] < 1 else ""))


if __name__ == "__main__":
    main()
