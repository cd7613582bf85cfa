"""The cache folder every embedded generator writes into, once and whole.

A data set is written to a temporary sibling folder, a ``COMPLETE`` marker holding its
generation parameters is added, and the folder is renamed into place: ``root`` is either
absent or finished. A finished ``root`` made with other parameters is a ``DataError``; so is
a non-empty folder without the marker (a run killed mid-write elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from visionbench.errors import DataError

MARKER = "COMPLETE"


def default_cache_dir() -> Path:
    """``$VISIONBENCH_CACHE`` if set, else ``~/.cache/visionbench``."""
    env = os.environ.get("VISIONBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visionbench"


def existing_params(root: Path, what: str) -> dict | None:
    """The params of a finished generation at ``root``; None if ``root`` does not exist."""
    if not root.exists():
        return None
    marker = root / MARKER
    if not marker.is_file():
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
            return None
        raise DataError(
            f"{root}: exists but is not a finished {what} data set (no {MARKER} marker); "
            "delete it or pick another folder"
        )
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{marker}: unreadable marker ({err}); delete {root}") from None


def check_same(root: Path, found: dict, wanted: dict, what: str) -> Path:
    if found != wanted:
        raise DataError(
            f"{root}: holds {what} data generated with other parameters ({found}, wanted "
            f"{wanted}); delete the folder or pick another"
        )
    return root


def write_once(root: str | Path, params: dict, what: str,
               write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary folder that becomes ``root``, unless ``root`` already
    holds a finished generation with the same ``params``."""
    root = Path(root)
    found = existing_params(root, what)
    if found is not None:
        return check_same(root, found, params, what)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(params, indent=2) + "\n")
        try:
            tmp.rename(root)
        except OSError:
            # Another process finished first: its copy must match ours.
            found = existing_params(root, what)
            if found is None:
                raise
            return check_same(root, found, params, what)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
