"""Adapting loaded weights to a new task: head replacement."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np


def replace_head(
    init: Mapping[str, Any], loaded: Mapping[str, Any], *, force: bool = False
) -> tuple[dict, list[str]]:
    """Takes the freshly initialised ``head`` from ``init`` when the class count differs (or force).

    Returns the adapted ``loaded`` variables and a log of what was done.
    """
    loaded = {k: dict(v) if isinstance(v, Mapping) else v for k, v in loaded.items()}
    init_head = init.get("params", {}).get("head")
    old_head = loaded.get("params", {}).get("head")
    if init_head is None:
        if old_head is not None:
            del loaded["params"]["head"]
            return loaded, ["head: dropped (model is headless)"]
        return loaded, []
    old_shape = None if old_head is None else np.shape(old_head["kernel"])
    new_shape = np.shape(init_head["kernel"])
    if force or old_shape != new_shape:
        loaded["params"]["head"] = init_head
        why = "on request" if force and old_shape == new_shape else f"{old_shape} -> {new_shape}"
        return loaded, [f"head: replaced with a fresh head ({why})"]
    return loaded, []


def log_surgery(source: str, lines: list[str]) -> None:
    for line in lines:
        logging.info("Pretrained %s: %s", source, line)
