"""Weights named by a model-hub id: ``hf://ORG/NAME/FILE.safetensors[@REVISION]``.

The file is fetched with ``huggingface_hub`` (the optional ``hub`` extra) into its cache
and then loaded like a local file. Only safetensors files are fetched: a pickle file from a
hub can run code when loaded, so it is refused before anything is downloaded.
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` work as for ``huggingface_hub`` itself (offline:
the cache only).
"""

from __future__ import annotations

import os
from pathlib import Path

from robustkd.errors import ConfigError, UnsafeCheckpointError

PREFIX = "hf://"


def is_hub_ref(value: str | Path | None) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse_hub_ref(ref: str) -> tuple[str, str, str | None]:
    """``(repo_id, filename, revision)`` of ``hf://ORG/NAME/FILE[@REVISION]``."""
    body, _, revision = ref[len(PREFIX):].partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise ConfigError(f"{ref!r} is not a hub file: use hf://ORG/NAME/FILE.safetensors "
                          "(optionally @REVISION)")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def fetch(ref: str) -> Path:
    """The local (cached) path of a hub file; safetensors only."""
    repo_id, filename, revision = parse_hub_ref(ref)
    if not filename.endswith(".safetensors"):
        raise UnsafeCheckpointError(f"{ref}: only .safetensors files are fetched from a hub "
                                    "(a pickle file can run code when loaded)")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ConfigError("hub weights need huggingface_hub: pip install 'robustkd[hub]'") \
            from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        path = hf_hub_download(repo_id, filename, revision=revision,
                               cache_dir=os.environ.get("HF_HUB_CACHE"),
                               local_files_only=offline)
    except LocalEntryNotFoundError:
        raise ConfigError(f"{ref} is not in the hub cache"
                          f"{' (HF_HUB_OFFLINE is set)' if offline else ''}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot fetch {ref}: {str(exc).splitlines()[0]}") from None
    return Path(path)


def local_weights(value: str | Path) -> str | Path:
    """A weights argument as a local path (hub references fetched first)."""
    return fetch(value) if is_hub_ref(value) else value
