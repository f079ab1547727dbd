"""A model folder's identity (``base_model.json``): the name and shape an adapter is checked against."""

from __future__ import annotations

import json
import os

IDENTITY_FILE = "base_model.json"


def read_identity(folder: str) -> dict:
    """The base-model identity stored in a converted model or adapter folder ({} if it has none)."""
    path = os.path.join(folder, IDENTITY_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged identity only loses the name; the shape checks still run on the config


def _folder_name(path: str) -> str:
    return read_identity(path).get("name") or os.path.basename(os.path.normpath(path))


def identity(config, name: str) -> dict:
    """What an adapter must match: the architecture's shape, plus a name for messages."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "name": name,
        "model_type": getattr(text, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "vocab_size": getattr(text, "vocab_size", None),
    }


def write_identity(folder: str, ident: dict) -> None:
    with open(os.path.join(folder, IDENTITY_FILE), "w") as f:
        json.dump(ident, f, indent=2)
