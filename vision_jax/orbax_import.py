"""orbax.checkpoint, imported without giving Python's root logger a handler.

orbax logs through absl while it is imported (``absl.logging.vlog`` in a type handler's
constructor), and absl's ``log`` calls ``logging.basicConfig()`` when the root logger has no
handler: a script that imports vision_jax, then calls ``logging.basicConfig(level=...,
format=...)`` got absl's stderr handler instead, its own call doing nothing. For the import, a
root logger without handlers holds Python's last-resort handler (warnings and errors to stderr,
as they go without handlers), removed after it; one with handlers (the command line's absl
handler) is left as it is. (orbax's logs during a run go through absl as well: absl sets the
root logger up then, as it does for any library that logs through it.)
"""

from __future__ import annotations

import logging
import types


def _import_orbax() -> types.ModuleType:
    root = logging.getLogger()
    hold = None if root.handlers else (logging.lastResort or logging.NullHandler())
    if hold is not None:
        root.addHandler(hold)
    try:
        import orbax.checkpoint as ocp
    finally:
        if hold is not None:
            root.removeHandler(hold)
    return ocp


ocp = _import_orbax()
