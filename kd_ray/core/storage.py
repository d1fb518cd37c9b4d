"""Storage on a local folder or an object store (s3://, gs://, file://) through pyarrow.fs,
the same layer Ray Train and Tune use.

Writes are atomic: locally a file is written under a temporary name and renamed; on object
stores a PUT is atomic per object, and multi-file results write their manifest last.
"""
from __future__ import annotations

import functools
import io
import json
import os
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

# How long an object store may stay unreachable before a storage call gives up (seconds): every
# call here is safe to repeat (reads, listings, whole-object writes, deletes), so it retries with
# backoff, then fails with one line naming the endpoint.
RETRY_S = float(os.environ.get("KD_RAY_STORAGE_RETRY_S", "120"))
_TRANSIENT = ("NETWORK_CONNECTION", "Couldn't connect", "Connection refused", "curlCode", "SLOW_DOWN",
              "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "HTTP status 5", "timed out", "Timeout")


class StorageUnreachable(OSError):
    """An object store stayed unreachable for RETRY_S seconds; the message names the endpoint."""


def endpoint(path: str) -> str:
    """Where ``path``'s object store is: its scheme and bucket, and a custom endpoint when one is set."""
    scheme, _, rest = str(path).partition("://")
    custom = os.environ.get("AWS_ENDPOINT_URL") if scheme == "s3" else None
    return f"{scheme}://{rest.split('/', 1)[0]}" + (f" at {custom}" if custom else "")


def _retrying(fn):
    """Retry ``fn(path, ...)`` on an object store while its errors are transient (connection
    refused or reset, throttling, 5xx), with backoff, for up to RETRY_S seconds."""
    @functools.wraps(fn)
    def call(path, *args, **kwargs):
        if is_local(path):
            return fn(path, *args, **kwargs)
        deadline, delay = time.monotonic() + RETRY_S, 0.5
        while True:
            try:
                return fn(path, *args, **kwargs)
            except FileNotFoundError:
                raise
            except OSError as e:
                if not any(t in str(e) for t in _TRANSIENT):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StorageUnreachable(f"storage: {endpoint(path)} unreachable for {RETRY_S:.0f} s "
                                             f"({str(e).splitlines()[0][:160]}); run again when it is back: "
                                             f"finished work is kept") from None
                time.sleep(delay)
                delay = min(2 * delay, 8.0)
    return call


# What pyarrow's object-store clients say when the endpoint is gone (inside Ray Data's and Tune's
# own reads and writes, which kd_ray does not wrap)
_ENDPOINT_DOWN = ("AWS Error NETWORK_CONNECTION", "curlCode", "AWS Error SERVICE_UNAVAILABLE", "AWS Error SLOW_DOWN")


def unreachable(error: BaseException, path: str, stage: str) -> StorageUnreachable | None:
    """The one-line error for a stage that failed because ``path``'s object store went away, else
    None: kd_ray's own storage calls retried first; Ray Data's and Tune's fail at their first try."""
    if isinstance(error, StorageUnreachable):  # kd_ray's own call, already retried and named
        return error
    if is_local(path):
        return None
    seen, texts = set(), []
    while error is not None and id(error) not in seen:  # the exception and what it wraps
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    line = next((ln for t in texts for ln in t.splitlines() if any(m in ln for m in _ENDPOINT_DOWN)), None)
    if line is None:
        return None
    return StorageUnreachable(f"storage: {endpoint(path)} unreachable during stage {stage} ({line.strip()[:160]}); "
                              f"run again when it is back: finished work is kept")


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def absolute(path: str) -> str:
    """A local path made absolute (what Ray's readers and writers want); URIs unchanged."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(base: str, *parts: str) -> str:
    base = str(base).rstrip("/")
    return "/".join([base, *[str(p).strip("/") for p in parts]])


def is_local(path: str) -> bool:
    """A folder on this machine (a plain path or file://), decided without touching the network."""
    return not is_uri(path) or str(path).startswith("file://")


@_retrying
def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


@_retrying
def size(path: str) -> int:
    """Bytes of the file at ``path``."""
    fs, p = resolve(path)
    return int(fs.get_file_info(p).size)


@_retrying
def write_bytes(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, p)  # atomic on one filesystem
    else:
        with fs.open_output_stream(p) as f:
            f.write(data)


@_retrying
def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode())


@_retrying
def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


@_retrying
def list_files(path: str, suffix: str = "", sizes: bool = False) -> list:
    """Files under a folder (recursively, sorted), as paths in the same form as ``path``; with
    ``sizes``, (path, bytes) pairs from the same listing."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    found = sorted((i.path[len(p):].lstrip("/"), i.size) for i in infos
                   if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [(join(path, r), int(n)) if sizes else join(path, r) for r, n in found]


@_retrying
def class_folders(path: str) -> list[str]:
    """The sorted names of the folders directly under ``path`` (none when it is not a folder)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(p)) if i.type == pafs.FileType.Directory)


def save_torch(path: str, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: str, data: bytes | None = None) -> Any:
    """``torch.load(..., weights_only=True)``; a corrupt or missing file names itself.

    ``data``: the file's bytes when the caller has already read them (no second read).
    """
    import torch

    try:
        raw = read_bytes(path) if data is None else data
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"corrupt checkpoint {path}: {type(e).__name__}: {e}; delete it to retrain") from None


_WRITABLE: set[tuple[str, str | None]] = set()  # (path, endpoint) pairs whose probe passed in this process


def check_writable(path: str, what: str = "runtime.storage_path") -> None:
    """Write and delete a probe file under ``path``: an unwritable folder or an unreachable object
    store fails here, in one line naming ``what``, before any work starts. S3 endpoints and
    credentials come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    Once per path and endpoint in a process: a later stage that finds the store gone is an outage
    (its own calls retry, then name it), not a bad setting."""
    key = (str(path), os.environ.get("AWS_ENDPOINT_URL"))
    if key in _WRITABLE:
        return
    probe = join(path, f".kd_ray_probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes.__wrapped__(probe, b"ok")  # no retrying: before any work, unreachable is a config error
        fs, p = resolve(probe)
        fs.delete_file(p)
    except Exception as e:  # OSError, PermissionError, pyarrow's S3 errors
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"{what}={path!r} is not writable or not reachable: {reason}") from None
    _WRITABLE.add(key)
