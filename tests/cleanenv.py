"""The environment a test gives a ``fieldnode`` it runs as a technician would: this one's, without the
``FIELDNODE_*`` settings a developer may have exported, except the suite's own (tests/conftest.py names the agent's
user as one that exists nowhere, so no verdict depends on this machine's users)."""

from __future__ import annotations

import os

KEEP = ("FIELDNODE_SERVICE_USER",)


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without ``FIELDNODE_*`` (but :data:`KEEP`), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDNODE_") or k in KEEP}
    env.update(extra)
    return env
