"""Lean CPU forward of backbone v2 for serving: Gemma 3's decoder written out, LoRA merged, int8 weights.

`LeanLM.from_audio_lm(model)` copies an `AudioLM` (transformers body + LoRA + new rows) into plain tensors:
every projection is W + (alpha / r) B A, then (by default) int8 weights per output channel (`Int8Linear`,
weight-only: activations are rounded to bf16 for the product, not quantised); norms, RoPE and attention stay fp32.
The output head is the model's cut head (`head_ids`), also int8. The result is tested against the transformers forward (`tests/test_audio_lm.py`).

The KV cache is preallocated per batch row (`LeanCache`): `prefill(row, ids)` appends a conversation's tokens to
its row, `decode(ids, rows)` advances several rows by one token in one batched pass (the thinker is memory-bound
on CPU, so a batch of 4 costs little more than 1). Sliding-window layers mask keys older than the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from npc_server.backbone.audio_lm import AudioLM, LoRALinear


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Int8Linear(nn.Module):
    """y = x W^T with W stored int8 per output channel (scale = max |row| / 127); x is rounded to bf16 for the
    product (`torch._weight_int8pack_mm`), the result is fp32. Weight-only: activations are not quantised."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        return torch._weight_int8pack_mm(flat, self.weight, self.scale).float().reshape(*x.shape[:-1], -1)


def _linear(weight: torch.Tensor, quantize: bool) -> nn.Module:
    if quantize:
        return Int8Linear(weight)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data.copy_(weight.float())
    lin.weight.requires_grad_(False)
    return lin


def _weight(module: nn.Module) -> torch.Tensor:
    return module.merged_weight() if isinstance(module, LoRALinear) else module.weight


@dataclass
class LeanCache:
    """Keys/values per layer [B, kv_heads, max_len, head_dim] and the number of tokens of each row."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [B] long

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def reset(self, row: int) -> None:
        self.lengths[row] = 0

    def rewind(self, row: int, keep: int) -> None:
        if not 0 <= keep <= int(self.lengths[row]):
            raise ValueError(f"row {row} has {int(self.lengths[row])} tokens, cannot keep {keep}")
        self.lengths[row] = keep

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class _LeanLayer(nn.Module):
    def __init__(self, layer: nn.Module, sliding: bool, quantize: bool):
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.heads, self.kv_heads, self.head_dim = a.config.num_attention_heads, a.config.num_key_value_heads, a.head_dim
        self.scaling, self.eps = a.scaling, a.config.rms_norm_eps
        self.sliding = a.config.sliding_window if sliding else None
        qkv = torch.cat([_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)])
        self.qkv, self.o = _linear(qkv, quantize), _linear(_weight(a.o_proj), quantize)
        self.gate_up = _linear(torch.cat([_weight(m.gate_proj), _weight(m.up_proj)]), quantize)
        self.down = _linear(_weight(m.down_proj), quantize)
        for name, norm in (("n_in", layer.input_layernorm), ("n_post_attn", layer.post_attention_layernorm),
                           ("n_pre_ffw", layer.pre_feedforward_layernorm), ("n_post_ffw", layer.post_feedforward_layernorm),
                           ("n_q", a.q_norm), ("n_k", a.k_norm)):
            self.register_buffer(name, norm.weight.detach().float().clone())

    def forward(self, x, cos, sin, kv, positions, key_mask):
        """x [B, T, D]; positions [B, T]; kv: per batch row (k_cache, v_cache, row) of this layer, tensors
        [R, kvh, L, hd] written at row/positions; key_mask [B, T, U]: attention reads only the first U cache
        positions (U: the longest row after this step), not the whole preallocated cache."""
        b, t, _ = x.shape
        h = _rms(x, self.n_in, self.eps)
        q, k, v = self.qkv(h).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = _rms(q.view(b, t, self.heads, self.head_dim), self.n_q, self.eps).transpose(1, 2)
        k = _rms(k.view(b, t, self.kv_heads, self.head_dim), self.n_k, self.eps).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        for i, (kc, vc, r) in enumerate(kv):
            kc[r, :, positions[i, 0] : positions[i, 0] + t] = k[i]
            vc[r, :, positions[i, 0] : positions[i, 0] + t] = v[i]
        mask = key_mask
        if self.sliding is not None:
            key_pos = torch.arange(key_mask.shape[-1])
            mask = mask & (key_pos[None, None, :] > positions[:, :, None] - self.sliding)
        outs = []
        for i, (kc, vc, r) in enumerate(kv):  # each row attends to its own cache (views, no copies)
            n = int(positions[i, -1]) + 1
            outs.append(F.scaled_dot_product_attention(q[i : i + 1], kc[r : r + 1, :, :n], vc[r : r + 1, :, :n],
                                                       attn_mask=mask[i : i + 1, None, :, :n], scale=self.scaling,
                                                       enable_gqa=self.heads != self.kv_heads))
        o = outs[0] if b == 1 else torch.cat(outs)
        x = x + _rms(self.o(o.transpose(1, 2).reshape(b, t, -1)), self.n_post_attn, self.eps)
        gate, up = self.gate_up(_rms(x, self.n_pre_ffw, self.eps)).chunk(2, dim=-1)
        return x + _rms(self.down(F.gelu(gate, approximate="tanh") * up), self.n_post_ffw, self.eps)


class LeanLM(nn.Module):
    def __init__(self, model: AudioLM, quantize: bool = True):
        super().__init__()
        body = model.body
        cfg = body.config
        self.n_text, self.hidden, self.eps = model.cfg.n_text, cfg.hidden_size, cfg.rms_norm_eps
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.embed_scale = model.embed_scale
        # looked up, never multiplied: bf16 when serving (the cached base weights are bf16 already, so no loss)
        self.text_embed = body.embed_tokens.weight.detach().to(torch.bfloat16 if quantize else torch.float32)
        self.new_embed = model.new_embed.weight.detach().float().clone()
        self.layer_types = list(cfg.layer_types)
        self.layers = nn.ModuleList(_LeanLayer(layer, t == "sliding_attention", quantize)
                                    for layer, t in zip(body.layers, self.layer_types))
        self.register_buffer("norm", body.norm.weight.detach().float().clone())
        self.inv_freq = {t: getattr(body.rotary_emb, f"{t}_inv_freq").float().clone() for t in set(self.layer_types)}
        self.rope_scale = {t: float(getattr(body.rotary_emb, f"{t}_attention_scaling", 1.0)) for t in set(self.layer_types)}
        self.head = _linear(model.head_weight().detach(), quantize)
        self.register_buffer("head_ids", model.head_ids.clone())
        self.register_buffer("head_index", model.head_index.clone())

    @classmethod
    def from_audio_lm(cls, model: AudioLM, quantize: bool = True) -> LeanLM:
        with torch.no_grad():
            return cls(model, quantize).eval()

    def new_cache(self, batch: int, max_len: int) -> LeanCache:
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        n = len(self.layers)
        return LeanCache([torch.zeros(shape) for _ in range(n)], [torch.zeros(shape) for _ in range(n)],
                         torch.zeros(batch, dtype=torch.long))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.n_text
        text = self.text_embed[torch.where(is_new, torch.zeros_like(ids), ids)].float()
        new = self.new_embed[torch.where(is_new, ids - self.n_text, torch.zeros_like(ids))]
        return torch.where(is_new[..., None], new, text) * self.embed_scale

    def forward(self, ids: torch.Tensor, cache: LeanCache, rows: list[int]) -> torch.Tensor:
        """Append ids [B, T] to cache rows `rows` (one per batch row) -> last hidden states [B, T, hidden]."""
        return self.forward_slots(ids, [(cache, r) for r in rows])

    @torch.inference_mode()
    def forward_slots(self, ids: torch.Tensor, slots: list[tuple[LeanCache, int]]) -> torch.Tensor:
        """Append ids [B, T] to the cache rows `slots` ((cache, row) per batch row; the caches may differ, e.g. one
        per conversation) -> last hidden states [B, T, hidden]. The weights are read once for the whole batch."""
        b, t = ids.shape
        start = torch.stack([c.lengths[r] for c, r in slots])
        for (c, r), s0 in zip(slots, start.tolist()):
            if s0 + t > c.max_len:
                raise ValueError(f"the conversation outgrows the cache ({c.max_len} tokens)")
        positions = start[:, None] + torch.arange(t)[None]
        key_pos = torch.arange(int((start + t).max()))  # attention reads the caches up to the longest row's end
        key_mask = key_pos[None, None, :] <= positions[:, :, None]  # causal, and nothing past the row's end
        x = self.embed(ids)
        rope = {}
        for typ, inv in self.inv_freq.items():
            freqs = positions[..., None].float() * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            rope[typ] = (emb.cos() * self.rope_scale[typ], emb.sin() * self.rope_scale[typ])
        for i, (layer, typ) in enumerate(zip(self.layers, self.layer_types)):
            kv = [(c.keys[i], c.values[i], r) for c, r in slots]
            x = layer(x, *rope[typ], kv, positions, key_mask)
        for (c, r), s0 in zip(slots, start.tolist()):
            c.lengths[r] = s0 + t
        return _rms(x, self.norm, self.eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., output rows] (the quantised head takes 2-d input)."""
        return self.head(hidden.reshape(-1, hidden.shape[-1])).reshape(*hidden.shape[:-1], -1)

    def prefill(self, cache: LeanCache, row: int, ids: list[int]) -> torch.Tensor:
        """Append one conversation's tokens -> logits after the last one [n_head]."""
        hidden = self.forward(torch.tensor([ids], dtype=torch.long), cache, [row])
        return self.logits(hidden[0, -1])

    def decode(self, cache: LeanCache, rows: list[int], ids: list[int]) -> torch.Tensor:
        """One token for each of several rows, in one batched pass -> logits [len(rows), n_head]."""
        return self.decode_slots([(cache, r) for r in rows], ids)

    def decode_slots(self, slots: list[tuple[LeanCache, int]], ids: list[int]) -> torch.Tensor:
        """One token for each of several cache rows (of any caches), in one batched pass -> logits [B, n_head]."""
        hidden = self.forward_slots(torch.tensor(ids, dtype=torch.long)[:, None], slots)
        return self.logits(hidden[:, 0])
