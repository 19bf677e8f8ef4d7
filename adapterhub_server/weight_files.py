"""Which weight files AdapterHub never loads: pickles.

`torch.load`, `pickle` and joblib files can run code when read, so base models, adapters and
registry uploads are accepted as safetensors only, and a directory that holds just pickle
checkpoints is refused with a message naming them. Every such check uses this one list.
"""

from __future__ import annotations

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Suffixes of weight files that are (or may be) pickles: torch.save, pickle, joblib."""


def is_pickle_file(name: str) -> bool:
    """Whether the file `name` (a base name or path) is a pickle by its suffix."""
    return name.lower().endswith(PICKLE_SUFFIXES)
