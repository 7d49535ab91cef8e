"""Access to the Hugging Face Hub that fails fast and clearly when there is no network.

The Hub libraries retry an unreachable host for the best part of a minute; we first try
the local cache, then check in a few seconds whether the Hub answers at all.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def env_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be used right now, or None if it answers."""
    if env_offline():
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"{host} is unreachable ({e.strerror or type(e).__name__})"
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
