"""Run records: atomic writes, config hashes, run ids, the environment and metrics.json.

Every record a run leaves is written through ``atomic_write_*``: the bytes go to a temporary
file in the destination folder, are flushed and fsynced, and then ``os.replace`` swaps it in.
A reader sees either the old file or the new one, never half of one, and a failure (a value
that does not serialise, a full disk, a kill) leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from visionbench.errors import UserError

TRACKED_PACKAGES = ("torch", "torchvision", "timm", "lightning", "torchmetrics", "numpy")
RESULT_KEYS = ("init", "protocol", "metric", "value")

_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONFIG_HASH = re.compile(r"^[0-9a-f]{8}$")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either the old one or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; records are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Serialise ``obj`` as indented JSON and write it to ``path`` atomically.

    Serialisation happens before any file is touched, so an object that cannot be serialised
    raises ``TypeError`` and leaves ``path`` as it was. Paths and numpy scalars/arrays are
    converted; anything else unknown is an error, never silently stringified.
    """
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    atomic_write_text(path, text)


def config_hash(config: dict) -> str:
    """8 hex chars of sha256 over the canonical JSON of ``config`` (sorted keys, no spaces)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8]


def make_run_id(experiment: str, cfg_hash: str, now: datetime | None = None) -> str:
    """``<UTC %Y%m%dT%H%M%SZ>-<experiment>-<cfg_hash>``; a naive ``now`` is taken as UTC."""
    if not _EXPERIMENT_NAME.match(experiment):
        raise UserError(
            f"experiment {experiment!r}: expected letters, digits, '.', '_' or '-' only"
        )
    if not _CONFIG_HASH.match(cfg_hash):
        raise UserError(f"config hash {cfg_hash!r}: expected 8 lowercase hex characters")
    now = datetime.now(timezone.utc) if now is None else now
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    stamp = now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{experiment}-{cfg_hash}"


def environment_info(precision: str, device: str) -> dict:
    """Everything needed to say where a number came from: versions, hardware, git commit."""
    import visionbench

    commit, dirty = _git_state(Path.cwd())
    cuda_available, cuda_device = _cuda_state()
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": {name: _package_version(name) for name in TRACKED_PACKAGES},
        "visionbench": getattr(visionbench, "__version__", None),
        "cuda_available": cuda_available,
        "cuda_device": cuda_device,
        "cpu_count": os.cpu_count(),
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "precision": precision,
        "device": device,
        "argv": list(sys.argv),
    }


def read_metrics(run_dir: str | os.PathLike) -> dict:
    """The parsed ``metrics.json`` of a run; ``UserError`` naming the file if missing/invalid."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; is {Path(run_dir)} a finished run folder?")
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    results = metrics.get("results", [])
    if not isinstance(results, list):
        raise UserError(f"{path}: 'results' must be a list")
    for index, result in enumerate(results):
        missing = [key for key in RESULT_KEYS if not isinstance(result, dict) or key not in result]
        if missing:
            raise UserError(f"{path}: results[{index}] lacks {', '.join(missing)}")
    return metrics


def is_finished(run_dir: str | os.PathLike) -> bool:
    """True when the run folder holds a readable metrics.json whose status is 'finished'."""
    try:
        return read_metrics(run_dir).get("status") == "finished"
    except UserError:
        return False


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; ``UserError`` naming the file and the position if it is invalid."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err.__class__.__name__})") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and type(obj).__module__.startswith("numpy"):
        return obj.tolist()  # numpy scalars and arrays
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cuda_state() -> tuple[bool, str | None]:
    try:
        import torch
    except ImportError:
        return False, None
    if not torch.cuda.is_available():
        return False, None
    return True, torch.cuda.get_device_name(0)


def _git_state(cwd: Path) -> tuple[str | None, bool | None]:
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(cwd, "status", "--porcelain")
    return commit, None if status is None else bool(status)


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
