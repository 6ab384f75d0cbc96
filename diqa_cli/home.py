"""The one home for diqa's user state: weights cache, embeddings cache, demo data.

``DIQA_HOME`` overrides the default, which is the platform's user cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def diqa_home() -> Path:
    env = os.environ.get("DIQA_HOME")
    if env:
        path = Path(env).expanduser()
    else:
        from platformdirs import user_cache_dir

        path = Path(user_cache_dir("diqa", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def subdir(name: str) -> Path:
    """A named folder under the home (``weights``, ``embeddings``, ``demo``…), created on demand."""
    path = diqa_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def offline_requested(flag: bool = False) -> bool:
    """``--offline`` or the Hugging Face environment switches both mean: never touch the network.

    A command's ``--offline`` flag switches offline mode on for the rest of the process
    (``DIQA_OFFLINE=1``), so weights resolved lazily deep inside a model (prompt encoders,
    perceptual networks, SlowFast) obey it as well as those the command resolves itself.
    """
    if flag:
        os.environ["DIQA_OFFLINE"] = "1"
        return True
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("DIQA_OFFLINE", "HF_HUB_OFFLINE")
    )
