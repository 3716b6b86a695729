"""Lean CPU inference forward for the Llama backbone: the same weights and KV cache as transformers, less overhead.

For a 6M-parameter model one decode step through `LlamaForCausalLM.forward` costs ~6-9 ms on this CPU, almost all
of it Python dispatch (mask building, output capturing, decorators, module hooks), not arithmetic. `FastForward`
computes the same function with a handful of fused torch ops per layer (one QKV matmul, one gate+up matmul, a
precomputed rotary table, `F.rms_norm`, SDPA) and writes keys/values into the very same `DynamicCache`, so sessions,
`crop`, forks and speculative decoding keep working unchanged. `forward_batch` runs one step for several
conversations at once: the matmuls are shared, only attention is per conversation.

Exactness: equal to the transformers forward up to float rounding (tests/test_backbone_fast.py compares logits and
greedy answers). The transformers path stays the reference and is used whenever `FastForward.supports` says no
(e.g. a model that is not a plain Llama, or a GPU where flash-attn is the fast path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class FastForward:
    """Inference-only view of a `transformers` LlamaForCausalLM (fp32/bf16 on CPU). Weights are shared or fused
    copies made once; re-create it after changing the model's weights."""

    def __init__(self, model: torch.nn.Module):
        if not self.supports(model):
            raise ValueError("FastForward needs a plain transformers Llama model on the CPU")
        cfg = model.config
        self.config = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                att, mlp = layer.self_attn, layer.mlp
                self.layers.append((
                    layer.input_layernorm.weight,
                    torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).contiguous(),
                    att.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                    mlp.down_proj.weight,
                ))
            inv_freq = inner.rotary_emb.inv_freq.float()
            pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
            freqs = pos[:, None] * inv_freq[None]
            emb = torch.cat([freqs, freqs], dim=-1)
            scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
            dtype = self.embed.dtype
            self.cos = (emb.cos() * scale).to(dtype)  # [max_pos, head_dim]
            self.sin = (emb.sin() * scale).to(dtype)
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.ffn = mlp.gate_proj.weight.shape[0]

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """True for a transformers Llama causal LM on the CPU with the default (unscaled) rotary embedding,
        no attention/MLP biases and SiLU MLP: the architecture `build_model` makes."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) != "llama":
            return False
        rope = getattr(cfg, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            return False
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            return False
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return False
        return next(model.parameters()).device.type == "cpu"

    # ---- pieces --------------------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _qkv(self, h: torch.Tensor, weights, cos: torch.Tensor, sin: torch.Tensor):
        """h [N, hidden] (normed) -> q [N, heads, hd], k/v [N, kv, hd], rotary applied with cos/sin [N, 1, hd]
        (q and k rotated in one go: they share the positions)."""
        qkv = F.linear(h, weights[1]).view(h.shape[0], self.n_heads + 2 * self.n_kv, self.head_dim)
        qk = self._rope(qkv[:, : self.n_heads + self.n_kv], cos, sin)
        return qk[:, : self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv:]

    def _attend(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, past: int) -> torch.Tensor:
        """q [T, heads, hd] for positions past..past+T-1; k_all/v_all [1, kv, past+T, hd] -> [T, heads*hd]."""
        T = q.shape[0]
        q = q.transpose(0, 1).unsqueeze(0)  # [1, heads, T, hd]
        if T == 1:
            out = F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=True)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=True)
        else:
            i = torch.arange(T).unsqueeze(1)
            j = torch.arange(past + T).unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=j <= i + past, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(T, self.q_size)

    def _mlp(self, x: torch.Tensor, weights) -> torch.Tensor:
        h = F.rms_norm(x, (x.shape[-1],), weights[3], self.eps)
        gate, up = F.linear(h, weights[4]).split(self.ffn, dim=-1)
        return x + F.linear(F.silu(gate) * up, weights[5])

    def _logits(self, x: torch.Tensor, rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """LM head; with `rows` ([lo, hi) id ranges) only those rows are computed and every other logit is -inf
        (exact when the caller masks the rest anyway, as constrained decoding does; saves most of the largest
        matmul: the head is ~30% of the weights read per step)."""
        h = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        if rows is None:
            return F.linear(h, self.lm_head).float()
        out = torch.full((h.shape[0], self.lm_head.shape[0]), float("-inf"))
        for lo, hi in rows:
            out[:, lo:hi] = F.linear(h, self.lm_head[lo:hi]).float()
        return out

    # ---- forward -------------------------------------------------------------------------------------
    def _run(self, ids: list[int], caches: list[DynamicCache], spans: list[slice]) -> torch.Tensor:
        """The layers for `ids`, rows `spans[b]` on top of `caches[b]` (updated in place) -> final hidden states.
        Projections and MLP run once over all rows; attention runs per conversation."""
        pasts = [c.get_seq_length() for c in caches]
        if max(p + s.stop - s.start for p, s in zip(pasts, spans)) > self.cos.shape[0]:
            raise ValueError(f"a conversation exceeds the model's {self.cos.shape[0]} positions")
        positions = torch.cat([torch.arange(p, p + s.stop - s.start) for p, s in zip(pasts, spans)])
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        x = self.embed[torch.tensor(ids, dtype=torch.long)]
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), w[0], self.eps)
            q, k, v = self._qkv(h, w, cos, sin)
            outs = []
            for cache, past, s in zip(caches, pasts, spans):
                k_all, v_all = cache.update(k[s].transpose(0, 1).unsqueeze(0), v[s].transpose(0, 1).unsqueeze(0), i)
                outs.append(self._attend(q[s], k_all, v_all, past))
            x = x + F.linear(outs[0] if len(outs) == 1 else torch.cat(outs), w[2])
            x = self._mlp(x, w)
        return x

    @torch.inference_mode()
    def forward(self, cache: DynamicCache, ids: list[int], last_only: bool = False,
                rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Feed `ids` on top of `cache` (updated in place); logits [len(ids), vocab] fp32, or [1, vocab] when
        `last_only` (same contract as `generator.forward_tokens`); `rows` limits the LM head (see `_logits`)."""
        x = self._run(ids, [cache], [slice(0, len(ids))])
        return self._logits(x[-1:] if last_only else x, rows)

    @torch.inference_mode()
    def forward_batch(self, caches: list[DynamicCache], tokens: list[int],
                      rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """One decode step for several conversations: token b goes on top of caches[b]. -> logits [B, vocab].
        The projections and MLP run once for the whole batch; attention runs per conversation."""
        x = self._run(tokens, caches, [slice(b, b + 1) for b in range(len(caches))])
        return self._logits(x, rows)
