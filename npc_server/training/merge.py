"""`npc-server train merge`: backbone stage 4, weighted average of checkpoints (AQAA: 5 SFT1 + 5 SFT2 + 1 DPO).

v1 backbones: every weight averaged. v2 backbones (LoRA on a frozen base): the weight changes are averaged exactly,
sum_i w_i B_i A_i, by stacking the adapters (the merged LoRA's rank is the sum of the ranks); the new embedding rows
are averaged and the output rows are the union.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from npc_server.backbone.model import (
    WEIGHTS_FILE,
    build_model,
    load_config,
    save_backbone,
)
from npc_server.training.lm_common import copy_tokenizer


def merge_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * W_i / sum_i w_i for every floating tensor (computed in fp32); others must be equal."""
    if len(states) != len(weights) or not states:
        raise ValueError("need one weight per checkpoint and at least one checkpoint")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"merge weights must be >= 0 with a positive sum, got {weights}")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ValueError(f"checkpoint {i} has different tensors: {sorted(set(s) ^ keys)[:5]}")
    total = float(sum(weights))
    merged = {}
    for k in states[0]:
        ref = states[0][k]
        if any(s[k].shape != ref.shape for s in states):
            raise ValueError(f"tensor {k} has different shapes across checkpoints")
        if ref.is_floating_point():
            acc = torch.zeros(ref.shape, dtype=torch.float32)
            for s, w in zip(states, weights):
                acc += s[k].float() * (w / total)
            merged[k] = acc.to(ref.dtype)
        else:
            if any(not torch.equal(s[k], ref) for s in states):
                raise ValueError(f"non-float tensor {k} differs across checkpoints")
            merged[k] = ref.clone()
    return merged


def merge_v2_states(states: list[dict[str, torch.Tensor]], configs: list[dict], weights: list[float]
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """Exact weighted average of v2 backbones' weight changes -> (trained state, config) of the merged backbone."""
    if len(states) != len(weights) or not states:
        raise ValueError("need one weight per checkpoint and at least one checkpoint")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"merge weights must be >= 0 with a positive sum, got {weights}")
    fixed = ("base", "n_text", "hidden", "lora_targets", "audio_input")
    for c in configs[1:]:
        if any(c[k] != configs[0][k] for k in fixed):
            raise ValueError(f"v2 backbones must share {', '.join(fixed)} to be merged")
    w = [x / float(sum(weights)) for x in weights]
    scales = [c["lora_alpha"] / c["lora_rank"] for c in configs]
    rank = sum(c["lora_rank"] for c in configs)
    merged: dict[str, torch.Tensor] = {
        "head_ids": torch.unique(torch.cat([s["head_ids"] for s in states])),
        "new_embed.weight": sum(wi * s["new_embed.weight"].float() for wi, s in zip(w, states)),
    }
    for key in (k for k in states[0] if k.endswith("lora_a")):
        merged[key] = torch.cat([s[key].float() for s in states], 0)
        b = key[: -len("lora_a")] + "lora_b"
        merged[b] = torch.cat([s[b].float() * (wi * si / scales[0]) for s, wi, si in zip(states, w, scales)], 1)
    config = {**configs[0], "lora_rank": rank, "lora_alpha": scales[0] * rank}
    return merged, config


def merge_v2(inputs: list[tuple[Path, float]], out: Path) -> None:
    from safetensors.torch import save_file

    states = [load_file(str(p / "model.safetensors")) for p, _ in inputs]
    configs = [json.loads((p / "config.json").read_text()) for p, _ in inputs]
    merged, config = merge_v2_states(states, configs, [w for _, w in inputs])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in merged.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    notice = inputs[0][0] / "NOTICE.md"
    if notice.is_file():
        (out / "NOTICE.md").write_text(notice.read_text())


def _parse_input(spec: str) -> tuple[Path, float]:
    path, _, weight = spec.rpartition(":") if ":" in spec else (spec, "", "1")
    try:
        return Path(path), float(weight)
    except ValueError:
        raise ValueError(f"bad --inputs entry {spec!r}; expected DIR or DIR:WEIGHT") from None


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npc-server train merge", description=__doc__)
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="backbone bundles as DIR:WEIGHT, e.g. sft1/model:5 sft2/model:5 dpo/model:1")
    parser.add_argument("--out", type=Path, required=True, help="output bundle folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                        help="storage dtype of the merged weights (default fp16: the shipped bundles are half size)")
    args = parser.parse_args(argv)
    inputs = [_parse_input(s) for s in args.inputs]
    from npc_server.training.lm_v2 import is_v2_backbone

    if any(is_v2_backbone(p) for p, _ in inputs):
        if not all(is_v2_backbone(p) for p, _ in inputs):
            raise ValueError("v1 and v2 backbones cannot be merged together")
        merge_v2(inputs, args.out)
        (args.out / "merge.json").write_text(json.dumps(
            {"inputs": [{"path": str(p), "weight": w} for p, w in inputs]}, indent=2) + "\n", encoding="utf-8")
        print(f"merged {len(inputs)} v2 backbones -> {args.out}")
        return 0
    configs = [load_config(p) for p, _ in inputs]
    if any(c != configs[0] for c in configs[1:]):
        raise ValueError("all merged backbones must share one config (preset and text vocabulary)")
    states = []
    for path, _ in inputs:
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
        states.append(load_file(str(path / WEIGHTS_FILE)))
    merged = merge_state_dicts(states, [w for _, w in inputs])
    model = build_model(configs[0])
    missing, unexpected = model.load_state_dict(merged, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"merged weights do not fit the model: missing={missing} unexpected={unexpected}")
    if configs[0].tie_embeddings:
        model.tie_weights()
    save_backbone(model, configs[0], args.out, dtype=DTYPES[args.dtype])
    copy_tokenizer(inputs[0][0], args.out)
    (args.out / "merge.json").write_text(json.dumps(
        {"inputs": [{"path": str(p), "weight": w} for p, w in inputs]}, indent=2) + "\n", encoding="utf-8")
    print(f"merged {len(inputs)} backbones -> {args.out}")
    return 0
