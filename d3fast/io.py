"""Atomic file writes and safe loads.

Every file d3fast writes goes to a temporary name in the same directory and is renamed
into place, so a crash or Ctrl-C leaves either the old file or the new one, never a torn
one. Tensors are stored as safetensors (no pickle).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from d3fast.errors import D3FastError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it to `path`.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise D3FastError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise D3FastError(f"{what} {path} is corrupt ({e}); delete it and re-run") from None


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, Any]) -> None:
    """Atomically write tensors as safetensors; metadata values are stored as JSON."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v) for k, v in metadata.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_metadata(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """The metadata of a `save_tensors` file, reading only its header."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise D3FastError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        return {k: json.loads(v) for k, v in raw.items()}
    except Exception as e:  # safetensors raises several types for torn files
        raise D3FastError(
            f"{what} {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "delete it and re-run the command that wrote it"
        ) from None


def load_tensors(path: str | os.PathLike, what: str = "file") -> tuple[dict, dict[str, Any]]:
    """Load a safetensors file written by `save_tensors`: (tensors, metadata).

    Raises D3FastError naming the file when it is missing, truncated or corrupt.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise D3FastError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except Exception as e:  # safetensors raises several types for torn files
        raise D3FastError(
            f"{what} {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "delete it and re-run the command that wrote it"
        ) from None
    return tensors, meta


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written directory into place (two renames; a crash in between leaves
    `final_dir.old`, which the next call removes)."""
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def remove_stale_temps(folder: Path) -> None:
    """Remove temporary files and directories that a killed process left in `folder`:
    `.<name>.*.tmp` files from `atomic_path`, and `<name>.tmp-<pid>` directories whose
    process no longer runs."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
        elif ".tmp-" in entry.name and entry.is_dir():
            pid = entry.name.rsplit(".tmp-", 1)[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
