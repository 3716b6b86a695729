"""`npc-server bench` runs end to end on a tiny model and reports every figure it promises."""

from __future__ import annotations

import json
import re

from npc_server.bench import main
from npc_server.paths import DEFAULT_PERSONAS_DIR


def test_bench_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    personas = tmp_path / "personas"
    personas.mkdir()
    for f in DEFAULT_PERSONAS_DIR.glob("*.yaml"):
        (personas / f.name).write_text(re.sub(r"max_answer_seconds: \d+", "max_answer_seconds: 1", f.read_text()))
    out = tmp_path / "bench.json"
    assert main(["--model-dir", str(tiny_model_dir), "--personas", str(personas), "--repeats", "1",
                 "--concurrency", "2", "--no-cascade", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    s = r["single"]
    assert s["questions"] == 6 and s["ttfa_ms_p50"] > 0 and s["rtf_total"] > 0 and s["decode_tokens_per_s"] > 0
    u = r["session_reuse"]
    assert u["history_tokens"] > u["prefill_tokens_followup"]
    assert set(r["concurrency"]) == {"2"}
    table = capsys.readouterr().out
    assert "time to first audio p50 / p95" in table and "follow-up without KV cache" in table
