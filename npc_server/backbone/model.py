"""The AQAA backbone: a Llama-style `transformers` causal LM over the audio-extended vocabulary, built from a config."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from npc_server.backbone.vocab import VocabLayout

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture of the backbone. `n_text` is the text tokenizer's vocabulary size; the full vocabulary
    (text + special + audio) is derived from it by `VocabLayout`."""

    n_text: int = 2048
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 704
    max_positions: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    preset: str = "custom"

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout(self.n_text)

    @property
    def vocab_size(self) -> int:
        return self.layout.size

    def to_llama_config(self) -> LlamaConfig:
        layout = self.layout
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        return LlamaConfig(
            vocab_size=layout.size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=layout.special("<|bos|>"),
            eos_token_id=layout.special("<|end|>"),
            pad_token_id=layout.special("<|pad|>"),
            initializer_range=0.02,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BackboneConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown BackboneConfig fields: {sorted(unknown)}")
        return cls(**data)


# Named size presets. "tiny" is for tests; "default" (~7M parameters with a 2048-token text vocabulary)
# is what ships in models/default/backbone and runs in real time on 2 CPU cores; "draft" ships in models/default/draft.
PRESETS: dict[str, BackboneConfig] = {
    "tiny": BackboneConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                           max_positions=1024, preset="tiny"),
    "small": BackboneConfig(hidden_size=192, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                            preset="small"),
    "default": BackboneConfig(preset="default"),
    # the draft model of speculative audio decoding (backbone/speculative.py): same vocabulary and context,
    # ~1/4 of the default's decode cost per token
    "draft": BackboneConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=352,
                            preset="draft"),
}


def preset(name: str, n_text: int) -> BackboneConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], n_text=n_text)


def attention_implementation(device: str | torch.device = "cpu") -> str:
    """transformers attention kernel for `device`: flash-attn 2 on a CUDA device when the `gpu` extra
    (flash-attn) is installed, else PyTorch SDPA (the CPU path; on CPU the generator's FastForward also uses SDPA)."""
    import importlib.util

    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_model(config: BackboneConfig, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A freshly initialised backbone (fp32)."""
    llama = config.to_llama_config()
    llama._attn_implementation = attn_implementation
    return LlamaForCausalLM(llama)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_backbone(model: LlamaForCausalLM, config: BackboneConfig, directory: str | Path,
                  dtype: torch.dtype | None = None) -> Path:
    """Write model.safetensors + config.json (BackboneConfig and the vocabulary layout) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight
        tensor = tensor.detach().cpu()
        state[name] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {"component": "backbone", "backbone": config.to_dict(), "vocab": config.layout.describe()}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def load_config(directory: str | Path) -> BackboneConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no backbone config at {path}")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("component") != "backbone":
        raise ValueError(f"{path} is not a backbone config (component={meta.get('component')!r})")
    return BackboneConfig.from_dict(meta["backbone"])


def load_backbone(directory: str | Path, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> tuple[LlamaForCausalLM, BackboneConfig]:
    """Load a backbone saved by `save_backbone`, in eval mode, on `device` (attention kernel chosen by
    `attention_implementation`; flash-attn needs fp16/bf16, so a CUDA device with flash-attn gets bf16)."""
    directory = Path(directory)
    config = load_config(directory)
    attn = attention_implementation(device)
    if attn == "flash_attention_2" and dtype == torch.float32:
        dtype = torch.bfloat16
    model = build_model(config, attn)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no backbone weights at {weights}")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {weights} does not match its config: missing={missing} unexpected={unexpected}")
    if config.tie_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval(), config
