"""Device names from config: the one place ``auto`` is resolved."""

from __future__ import annotations


def auto_device(name: str) -> str:
    """Map ``auto`` to ``cuda`` when torch sees a GPU, else ``cpu``; other names pass through.

    torch is imported only when ``name`` is ``auto``, so importing this module stays cheap.
    """
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
