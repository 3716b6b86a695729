"""Backbone v2's DPO stage (`train prefer`) and exact merge (`train merge` on v2 backbones) on tiny models."""

from __future__ import annotations

import random

import numpy as np
import torch

from npc_server.backbone.template_v2 import DialogueFormat
from npc_server.training.lm_v2 import sequence_logps
from npc_server.training.prefer import build_pairs, collate_pairs, make_loss, preference_accuracy, reference_logps
from tests.test_answer_v2 import CharTokenizer, _learnable_model, _row


def _rows() -> list[dict]:
    rows = [_row(0, "innkeeper", "price?", "five gold.", ["five gold"]),
            _row(1, "guard", "price?", "two gold.", ["two gold"]),
            _row(2, "innkeeper", "ale?", "two gold an ale.", ["two gold"])]
    for r in rows:
        r["rejected_text"] = "i do not know."
    return rows


def test_pairs_share_the_prompt_and_differ_in_the_answer():
    model = _learnable_model()
    fmt = DialogueFormat(model.cfg.layout, CharTokenizer())
    pairs = build_pairs(fmt, _rows() * 4, {"innkeeper": "greta", "guard": "angus"}, 0.5, random.Random(0))
    assert len(pairs) == 12 and {p.kind for p in pairs} <= {"corpus rejected", "other persona", "too long"}
    for p in pairs:
        n = p.chosen.targets.index(next(t for t in p.chosen.targets if t != -100))
        assert p.chosen.ids[: n + 1] == p.rejected.ids[: n + 1]  # one prompt
        assert p.chosen.ids != p.rejected.ids
    ids, tgt, ref = collate_pairs(pairs, [0, 1], 64, 0)
    assert ids.shape == (4, 64) and ref.shape == (2, 2)


def test_dpo_steps_raise_the_preference_for_the_chosen_answers():
    from npc_server.training.lm_v2 import train_loop

    model = _learnable_model()
    fmt = DialogueFormat(model.cfg.layout, CharTokenizer())
    pairs = build_pairs(fmt, _rows() * 3, {"innkeeper": "greta", "guard": "angus"}, 0.0, random.Random(0))
    reference_logps(model, pairs, 0, "fp32", progress=False)
    ids, tgt, ref = collate_pairs(pairs, [0], 64, 0)
    logps, _ = sequence_logps(model, ids, tgt)
    assert torch.allclose(logps, ref[0], atol=1e-4)  # before training the policy is the reference
    before = preference_accuracy(model, pairs, 0)
    result = train_loop(model, pairs, minutes=5, batch_tokens=256, lr=3e-3, precision="fp32", pad_id=0, max_steps=30,
                        progress=False, batch_loss=make_loss(0.1, 0.0), make_batch=collate_pairs)
    assert result.losses[-1] < result.losses[0]
    assert preference_accuracy(model, pairs, 0) == 1.0 > before


def test_v2_merge_averages_the_weight_changes_exactly(tmp_path):
    from npc_server.backbone.audio_lm import AudioLM
    from npc_server.training.merge import main
    from tests.test_audio_lm import tiny_body, tiny_model

    a, b = tiny_model(seed=1), tiny_model(seed=2)
    with torch.no_grad():
        for n, p in b.named_parameters():
            if "lora_" in n or n.startswith("new_embed"):
                p.add_(torch.randn_like(p) * 0.05)
    b.set_head(torch.arange(0, 140))
    a.save_pretrained(tmp_path / "a", dtype=torch.float32)
    b.save_pretrained(tmp_path / "b", dtype=torch.float32)
    assert main(["--inputs", f"{tmp_path / 'a'}:3", f"{tmp_path / 'b'}:1", "--out", str(tmp_path / "m")]) == 0
    m = AudioLM.from_pretrained(tmp_path / "m", body=tiny_body(seed=1))
    assert m.cfg.lora_rank == 8 and m.head_ids.numel() == b.head_ids.numel()  # ranks stacked, rows united
    la, lb, lm = (x.body.layers[0].self_attn.q_proj for x in (a, b, m))
    delta = lambda l: l.scale * (l.lora_b @ l.lora_a)
    assert torch.allclose(delta(lm), 0.75 * delta(la) + 0.25 * delta(lb), atol=1e-2 * float(delta(la).detach().abs().max()))
    assert torch.allclose(m.new_embed.weight, 0.75 * a.new_embed.weight + 0.25 * b.new_embed.weight, atol=1e-2)
