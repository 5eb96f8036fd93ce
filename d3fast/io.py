"""Atomic file writes, safe loads, locks and temporary files.

Every file d3fast writes goes to a temporary name in the same directory and is renamed
into place, so a crash, Ctrl-C or a full disk leaves either the old file or the new one,
never a torn one; a failed write becomes one D3FastError naming the path and the free
space. Temporary names carry their writer (host and pid), so a cleanup removes only the
temporaries of processes that are gone, never those of a live job sharing the directory.
Tensors are stored as safetensors (no pickle).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp")
    except OSError as e:
        raise write_failure(path, e) or e from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        failure = write_failure(path, e)
        if failure is not None:
            raise failure from None
        raise


# what the writers d3fast uses say when the disk fills or a size limit is hit: OSError with
# these errnos (numpy, json), SafetensorError "os error 28", torch's zip writer "unexpected pos"
_FULL_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file size limit was reached"}
_FULL_TEXTS = ("no space left", "os error 28", "os error 122", "os error 27", "file too large", "unexpected pos",
               "failed writing", "file write failed", "iostream error", "requested and")
_PLACE_ERRNOS = {errno.EISDIR: "it is a directory", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied", errno.EROFS: "the file system is read-only",
                 errno.ENOTDIR: "a part of the path is not a directory"}


def write_failure(path: str | os.PathLike | None, e: BaseException) -> D3FastError | None:
    """A D3FastError for an exception that means "could not write `path`": a full disk, a
    quota or size limit (naming the free space), or a place that cannot be written (a
    directory, no permission, a read-only file system); None for any other exception.
    `path` None: the writer named no file, and the message names none either."""
    if isinstance(e, D3FastError | KeyboardInterrupt | SystemExit):
        return None
    if isinstance(e, OSError) and e.errno in _PLACE_ERRNOS:
        where = "could not write a file" if path is None else f"cannot use {path}"
        return D3FastError(f"{where}: {_PLACE_ERRNOS[e.errno]}"
                           + ("" if path is None else "; move it aside or choose another path"))
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        why = _FULL_ERRNOS[e.errno]
    elif any(t in str(e).lower() for t in _FULL_TEXTS):
        why = f"{'a' if path is None else 'the'} write failed ({str(e).splitlines()[0][:120]})"
    else:
        return None
    size_limit = (isinstance(e, OSError) and e.errno == errno.EFBIG) or any(
        t in str(e).lower() for t in ("os error 27", "file too large"))
    fix = "raise the file size limit (ulimit -f)" if size_limit else "free some space"
    if path is None:  # the failing writer named no file (torch.save's zip writer, PIL)
        return D3FastError(f"could not write a file: {why}; {fix} and run the command again")
    path = Path(path)
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return D3FastError(f"could not write {path}: {why}; {free}. The previous {path.name} is intact, if there "
                       f"was one: {fix} and run the command again")


def owner_tag() -> str:
    """Who writes a temporary: a short hash of the host and the pid ("3f9a1c2e-12345")."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def owner_gone(tag: str) -> bool:
    """Whether the writer named by `tag` (exactly owner_tag's form) has ended. A writer on
    another host is never judged gone (its pid means nothing here), and a name of any other
    form (a user's `thesis.old-2023`) is not d3fast's: never judged gone either."""
    host, _, pid = tag.rpartition("-")
    if not (pid.isdigit() and re.fullmatch(r"[0-9a-f]{8}", host)):
        return False
    if host != owner_tag().split("-")[0]:
        return False
    return not pid_alive(int(pid))


@contextlib.contextmanager
def locked(path: str | os.PathLike, wait: bool = False) -> Iterator[bool]:
    """Hold an flock on `path` (created if missing), released by the OS however the process
    ends. Yields True when held; with wait=False, False when another process holds it. The
    holder's pid is written into the file for messages (`lock_holder`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield True
    finally:
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


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


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """`record` plus "seal": the sha256 of its canonical JSON. Files only d3fast writes
    (manifests, history lines) carry one, so an edit or bit rot that still parses as JSON is
    caught by `unseal` instead of being used."""
    body = {k: v for k, v in record.items() if k != "seal"}
    return {**body, "seal": _json_digest(body)}


def unseal(record: Any, what: str, path: str | os.PathLike) -> Any:
    """`record` without its seal, after checking it. A record without one is refused: it
    was written by hand (or by a d3fast older than seals), and letting it pass would let
    any edit that drops the seal pass too.

    Raises:
        D3FastError: no seal, or content that differs from what was sealed.
    """
    if not isinstance(record, dict) or "seal" not in record:
        raise D3FastError(f"{what} {path} carries no seal: d3fast did not write it as it is (written by hand, or by "
                          "a d3fast older than seals); make it again with the command that writes it")
    body = {k: v for k, v in record.items() if k != "seal"}
    if record["seal"] != _json_digest(body):
        raise D3FastError(f"{what} {path} was changed after d3fast wrote it (its seal does not match)")
    return body


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise D3FastError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise D3FastError(f"{what} {path} is corrupt ({e}); delete it and re-run") from None
    except OSError as e:  # a directory where the file should be, no permission
        raise D3FastError(f"cannot read {what} {path}: {e.strerror}") from None


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_sha256(path: str | os.PathLike, digest: str, what: str, fix: str) -> None:
    """Check that `path` hashes to `digest`, once per process for an unchanged file (same
    size and mtime), so a flipped byte is refused before anything is read from it.

    Raises:
        D3FastError: the file differs from what was written ("corrupt"), with `fix`.
    """
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key) == digest:
        return
    if sha256_file(path) != digest:
        raise D3FastError(f"{what} {path} does not match the sha256 recorded when it was written (corrupt); {fix}")
    _VERIFIED[key] = digest


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


def tensors_sha256(tensors: dict) -> str:
    """sha256 of named tensors as a safetensors file stores them: names in sorted order, each
    with its dtype, shape and bytes. What an export's metadata carries, so a flipped bit in
    any tensor is refused on load (safetensors checks the header, not the data)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_metadata(path: str | os.PathLike, what: str = "file", tensor_shapes: bool = False) -> dict[str, Any]:
    """The metadata of a `save_tensors` file, reading only its header; with `tensor_shapes`,
    also {"__shapes__": {name: shape}} of the tensors it holds."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise D3FastError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            meta: dict[str, Any] = {k: json.loads(v) for k, v in raw.items()}
            if tensor_shapes:
                meta["__shapes__"] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        return meta
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
    """Swap a fully written directory into place: the old one (if any) is renamed aside to
    `<name>.old-<owner>` (this process's own name, so no directory d3fast did not make is ever
    touched), the new one renamed in, and the old one removed. A crash in between leaves the
    `.old-<owner>` directory, which `remove_stale_temps` clears once its writer is gone."""
    old = final_dir.with_name(f"{final_dir.name}.old-{owner_tag()}")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def temp_dir(final: Path) -> Path:
    """The name a directory is built under before `replace_dir` swaps it in."""
    return final.with_name(f"{final.name}.tmp-{owner_tag()}")


def remove_stale_temps(folder: Path) -> None:
    """Remove the temporaries that ended writers left in `folder`: `.<name>.<owner>.*.tmp`
    files from `atomic_path`, `<name>.tmp-<owner>` directories from `temp_dir` and
    `<name>.old-<owner>` directories that `replace_dir` set aside before a crash. Those of
    live writers, and of writers on other hosts, stay."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        name = entry.name
        if name.startswith(".") and name.endswith(".tmp") and entry.is_file():
            parts = name[: -len(".tmp")].rsplit(".", 2)  # [".<name>", owner, random]
            if len(parts) == 3 and owner_gone(parts[1]):
                entry.unlink(missing_ok=True)
        elif entry.is_dir() and any(
            mark in name and owner_gone(name.rsplit(mark, 1)[1]) for mark in (".tmp-", ".old-")
        ):
            shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # gone, or a number no pid can be
        return False
    except PermissionError:
        return True
    return True


def timestamp() -> str:
    """Local time with its UTC offset, as every record d3fast writes holds it
    (`created`, `updated`, history lines): 2026-12-06T17:11:50+0000."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def file_stamp() -> str:
    """Local time as a file or directory name sorts it: 20261206-171150 (run directories,
    profiles, crash logs)."""
    return time.strftime("%Y%m%d-%H%M%S")


def utc_timestamp() -> str:
    """UTC, ISO 8601 to the second: 2026-12-06T17:11:50+00:00 (evaluation reports, which
    are compared across machines)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def utc_file_stamp() -> str:
    """UTC as a file name sorts it: 20261206T171150Z (kept evaluations)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
