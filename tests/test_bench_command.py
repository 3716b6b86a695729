"""`npc-server bench` runs end to end on a tiny model and reports every figure it promises."""

from __future__ import annotations

import json

from npc_server.bench import main
from npc_server.tiny import capped_personas


def test_bench_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    personas = capped_personas(tmp_path / "personas")
    out = tmp_path / "bench.json"
    assert main(["--model-dir", str(tiny_model_dir), "--personas", str(personas), "--repeats", "1",
                 "--clients", "2", "--no-cascade", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    s = r["single"]
    assert s["questions"] == 6 and s["ttfa_ms_p50"] > 0 and s["rtf_total"] > 0 and s["decode_tokens_per_s"] > 0
    u = r["session_reuse"]
    assert u["history_tokens"] > u["prefill_tokens_followup"]
    assert set(r["concurrency"]) == {"2"} and r["concurrency"]["2"]["refused"] == []
    assert r["rss_mb"] > 0 and r["peak_rss_mb"] >= r["rss_mb"]
    table = capsys.readouterr().out
    assert "time to first audio p50 / p95" in table and "follow-up without KV cache" in table
    assert "memory after the concurrent runs" in table
