"""Files a job writes: whole or not at all.

Every output (image, report, benchmark results, cached latents) goes through a temporary file
in the target's folder and a rename, so a file that stands under its name is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomically", "write_json", "write_text"]


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(staging_path)``, then rename the staging file to ``path`` (folders made as
    needed). If ``write`` raises, ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    try:
        write(staging)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(target)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` into ``path``, atomically."""
    write_atomically(path, lambda staging: staging.write_text(text))


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """``data`` as JSON (with a final newline) into ``path``, atomically."""
    write_text(path, json.dumps(data, indent=indent) + "\n")
