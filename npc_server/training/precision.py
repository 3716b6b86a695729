"""Training precision: whether bf16 autocast is actually faster than fp32 on this CPU (measured once per process).

bf16 autocast halves training time on CPUs with native bf16 matmuls (AVX512-BF16 / AMX) and is 5-20x slower on
CPUs without them (measured on an AVX2-only AMD EPYC: a backbone step 45 s in bf16 vs 2.3 s in fp32). The training
commands default to `auto`: bf16 where the CPU reports native bf16 instructions (avx512_bf16 / amx_bf16 in
/proc/cpuinfo), fp32 where it reports none; only where the flags cannot be read, a small forward + backward is
timed in both (a timing taken while other jobs load the cores once picked fp32 on a native-bf16 CPU).
"""

from __future__ import annotations

import functools
import time

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU reports native bf16 matmul instructions; None when its flags cannot be read."""
    try:
        text = open(cpuinfo, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def bf16_is_faster() -> bool:
    """Native bf16 per the CPU flags; where unknown, time a 256 -> 704 -> 256 MLP forward + backward on 512 rows, bf16 autocast vs fp32 (best of 3 each)."""
    native = native_bf16()
    if native is not None:
        return native
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(256, 704), torch.nn.SiLU(), torch.nn.Linear(704, 256))
    x = torch.randn(512, 256)

    def best(bf16: bool) -> float:
        times = []
        for _ in range(4):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = layers(x).float().square().mean()
            loss.backward()
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return best(True) < 0.8 * best(False)


def resolve(precision: str) -> str:
    """"auto" -> "bf16" where bf16 autocast measured faster on this CPU, else "fp32"; other values pass through."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() or bf16_is_faster() else "fp32"
    return precision
