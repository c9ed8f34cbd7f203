"""Pointer files of the Lightning plugin: JSON files that name a ckptmirror step (no pickle).

Part of :mod:`ckptmirror.integrations.lightning` (see its docstring for how Lightning's
checkpoint paths map onto steps): reading, validating and atomically writing a pointer or a
release marker, and scanning a directory for them, on the local disk or any fsspec URL; and the
JSON form of the callback state a pointer carries (:func:`encode_callbacks`,
:func:`callbacks_delta`, :func:`apply_callbacks`). Nothing here imports Lightning.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CkptMirrorError

#: The ``format`` field of a pointer file.
POINTER_FORMAT = "ckptmirror.lightning.pointer"
POINTER_VERSION = 1
#: The ``format`` of a release marker: ``.ckptmirror-release-<step>.json`` next to the pointer that
#: last named a step, written before the step is deleted and removed after, so that a process
#: killed mid-delete leaves a note the next one (scanning that directory) acts on.
RELEASE_FORMAT = "ckptmirror.lightning.release"
RELEASE_PREFIX = ".ckptmirror-release-"
#: Temp files of pointer writes: ``.<name>.tmp-<32 hex>``; a crash mid-write leaves one behind.
TMP_INFIX = ".tmp-"
_TMP_RE = re.compile(r"\..+" + re.escape(TMP_INFIX) + r"[0-9a-f]{32}\Z")
#: A pointer is a few hundred bytes; anything larger is not one (and is never read whole).
MAX_POINTER_BYTES = 1 << 16


class PointerError(CkptMirrorError, ValueError):
    """A file at a checkpoint path is not a valid ckptmirror pointer (``path`` names it)."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        super().__init__(f"{path} is not a ckptmirror checkpoint pointer: {why}")


def _fs_of(path: str) -> tuple[Any, str, bool]:
    """(fsspec filesystem, path inside it, whether it is the local disk) for a checkpoint path."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, inner = url_to_fs(path)
    return fs, inner, isinstance(fs, LocalFileSystem)


def _norm(path: Any) -> str:
    """The key a path is known by: absolute and normalised on the local disk, the URL otherwise."""
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if "://" in p and not p.startswith("file://"):
        return p
    return os.path.abspath(os.path.normpath(p.removeprefix("file://")))


def _parent(path: str) -> str:
    if "://" in path:
        return path.rsplit("/", 1)[0]
    return os.path.dirname(path)


def read_pointer(path: Any, *, release: bool = False) -> dict[str, Any]:
    """Parse the pointer file at ``path``: ``{"format", "version", "step", "replicas", "keys",
    "callbacks", ...}`` (``"callbacks"``: ``{}`` in a pointer written without it).

    Raises ``FileNotFoundError`` if there is no file, and :class:`PointerError` if the file is not a
    pointer (a ``torch.save`` checkpoint, a directory, a damaged file). Never unpickles anything.
    """
    p = _norm(path)
    fs, inner, local = _fs_of(p)
    if local:
        if os.path.isdir(inner):
            raise PointerError(p, "it is a directory")
        with open(inner, "rb") as f:  # FileNotFoundError as it is
            data = f.read(MAX_POINTER_BYTES + 1)
    else:
        if not fs.exists(inner):
            raise FileNotFoundError(f"checkpoint pointer not found: {p}")
        with fs.open(inner, "rb") as f:
            data = f.read(MAX_POINTER_BYTES + 1)
    return _parse_pointer(p, data, RELEASE_FORMAT if release else POINTER_FORMAT)


def _parse_pointer(path: str, data: bytes, fmt: str = POINTER_FORMAT) -> dict[str, Any]:
    if len(data) > MAX_POINTER_BYTES:
        raise PointerError(path, f"larger than {MAX_POINTER_BYTES} bytes (a torch.save checkpoint?)")
    if not data.lstrip().startswith(b"{"):
        pickled = data[:1] == b"\x80" or data[:2] == b"PK"  # pickle protocol 2+, torch.save's zip
        what = " (a pickle or torch.save checkpoint: load it with Lightning's TorchCheckpointIO)" if pickled else ""
        raise PointerError(path, f"not JSON{what}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PointerError(path, f"invalid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise PointerError(path, f"no 'format': {fmt!r} field")
    if doc.get("version") != POINTER_VERSION:
        raise PointerError(path, f"pointer version {doc.get('version')!r} (this ckptmirror reads {POINTER_VERSION})")
    step = doc.get("step")
    if type(step) is not int or step < 0:
        raise PointerError(path, f"bad step {step!r}")
    for field in ("replicas", "keys"):
        v = doc.get(field)
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise PointerError(path, f"'{field}' must be a list of strings")
    callbacks = doc.setdefault("callbacks", {})  # optional: pointers written before it have none
    if not (isinstance(callbacks, dict) and all(isinstance(v, dict) for v in callbacks.values())):
        raise PointerError(path, "'callbacks' must map callback state keys to objects")
    return doc


def _write_pointer(path: str, doc: Mapping[str, Any]) -> None:
    """Write a pointer atomically: a reader sees the old one or the new one, never a torn file.

    On the local disk: a temp file in the same directory, fsync, rename over ``path``, fsync the
    directory (the parent is created). Elsewhere (an fsspec URL): one object put, which object
    stores make atomic.
    """
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")
    fs, inner, local = _fs_of(path)
    if not local:
        fs.makedirs(_parent(inner), exist_ok=True)
        fs.pipe_file(inner, data)
        return
    directory = os.path.dirname(inner)
    os.makedirs(directory, exist_ok=True)
    # A name that ModelCheckpoint's last*.ckpt scan never matches (the suffix is not .ckpt).
    tmp = os.path.join(directory, f".{os.path.basename(inner)}{TMP_INFIX}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, inner)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove_file(path: str) -> None:
    fs, inner, local = _fs_of(path)
    if local:
        try:
            os.unlink(inner)
        except FileNotFoundError:
            return
        _fsync_dir(os.path.dirname(inner))
    elif fs.exists(inner):
        fs.rm(inner)


def _release_path(directory: str, step: int) -> str:
    """The release marker of ``step`` in ``directory`` (hidden; never matched by ``last*.ckpt``)."""
    sep = "/" if "://" in directory else os.sep
    return f"{directory}{sep}{RELEASE_PREFIX}{step:012d}.json"


def _scan_pointers(directory: str) -> tuple[dict[str, int], dict[int, str]]:
    """Pointer files directly in ``directory`` (normalised path -> step) and release markers
    (step -> path); other files are ignored."""
    pointers: dict[str, int] = {}
    markers: dict[int, str] = {}
    fs, inner, local = _fs_of(directory)
    entries: list[str] = []
    try:
        if local:
            with os.scandir(inner) as it:
                for e in it:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    if _TMP_RE.match(e.name):
                        # A pointer write cut short by a crash (scans precede this process's
                        # writes to the directory): the old pointer, if any, is intact.
                        _remove_file(e.path)
                    elif e.stat().st_size <= MAX_POINTER_BYTES:
                        entries.append(e.path)
        else:
            for d in fs.ls(inner, detail=True):
                if d.get("type") == "file" and (d.get("size") or 0) <= MAX_POINTER_BYTES:
                    entries.append(fs.unstrip_protocol(d["name"]))
    except FileNotFoundError:
        return pointers, markers
    for full in entries:
        try:
            doc = read_pointer(full, release=os.path.basename(full).startswith(RELEASE_PREFIX))
        except (OSError, PointerError):
            continue
        if doc["format"] == RELEASE_FORMAT:
            markers[doc["step"]] = _norm(full)
        else:
            pointers[_norm(full)] = doc["step"]
    return pointers, markers


# ----------------------------------------------------------------------------- callback state
# ModelCheckpoint saves one global_step several times (a top-k file, then last.ckpt), and the
# plugin stores the step once: the state of the first call. The calls differ in the callbacks'
# bookkeeping (``last_model_path`` is set to last.ckpt just before that file's save), so each
# pointer carries the fields of its call's ``checkpoint["callbacks"]`` that differ from the stored
# state, in JSON, and loading puts them back: a resume sees what that file's own save held.
# Values are encoded so that they decode to what they were: dicts keep their order (a list of
# items), tuples stay tuples, small tensors keep dtype and shape. Other values are not encoded
# (``_OPAQUE``): a pointer cannot carry them, and the stored state's value is what loads.

_OPAQUE: Any = type("_Opaque", (), {"__repr__": lambda self: "<not JSON-encodable>"})()
_TENSOR = "__ckptmirror_tensor__"
_DICT = "__ckptmirror_dict__"
_TUPLE = "__ckptmirror_tuple__"
#: Tensors up to this many elements are encoded (scores, step counters); larger ones are not.
MAX_TENSOR_ITEMS = 64
#: A pointer's callbacks delta larger than this (JSON) is left out, with a warning.
MAX_CALLBACKS_BYTES = 16 << 10
_MAX_DEPTH = 32


class _NotEncodable(Exception):
    pass


def _encode(value: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise _NotEncodable
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() > MAX_TENSOR_ITEMS or value.is_complex() or value.layout != torch.strided:
            raise _NotEncodable
        dtype = str(value.dtype).removeprefix("torch.")
        if getattr(torch, dtype, None) is not value.dtype:
            raise _NotEncodable
        flat = value.detach().cpu().reshape(-1).tolist()
        return {_TENSOR: {"dtype": dtype, "shape": list(value.shape), "values": flat}}
    if type(value) is dict:
        return {_DICT: [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]}
    if type(value) is list:
        return [_encode(v, depth + 1) for v in value]
    if type(value) is tuple:
        return {_TUPLE: [_encode(v, depth + 1) for v in value]}
    raise _NotEncodable


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ValueError(f"not an encoded value: {value!r}")
    ((tag, body),) = value.items()
    if tag == _DICT:
        return {_decode(k): _decode(v) for k, v in body}
    if tag == _TUPLE:
        return tuple(_decode(v) for v in body)
    if tag == _TENSOR:
        dtype = getattr(torch, body["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a dtype: {body['dtype']!r}")
        return torch.tensor(body["values"], dtype=dtype).reshape(body["shape"])
    raise ValueError(f"not an encoded value: {value!r}")


def encode_callbacks(callbacks: Any) -> dict[str, dict[str, Any]]:
    """``checkpoint["callbacks"]`` as callback state key -> field -> JSON form, or ``_OPAQUE``
    where a value has none (a callback whose state is not a dict with str keys: all ``_OPAQUE``)."""
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(callbacks, Mapping):
        return out
    for key, state in callbacks.items():
        if not isinstance(key, str):
            continue
        if not (isinstance(state, Mapping) and all(isinstance(f, str) for f in state)):
            out[key] = {"": _OPAQUE}
            continue
        fields: dict[str, Any] = {}
        for f, v in state.items():
            try:
                fields[f] = _encode(v)
            except _NotEncodable:
                fields[f] = _OPAQUE
        out[key] = fields
    return out


def callbacks_delta(stored: Mapping[str, Mapping[str, Any]], call: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The fields of ``call`` (one save's :func:`encode_callbacks`) that differ from ``stored``
    (that of the save whose state the step holds), as they go into a pointer. A callback the
    stored state lacks is included whole, if it can be encoded whole."""
    delta: dict[str, Any] = {}
    for key, fields in call.items():
        base = stored.get(key)
        if base is None:
            if all(v is not _OPAQUE for v in fields.values()):
                delta[key] = dict(fields)
            continue
        diff = {f: v for f, v in fields.items() if v is not _OPAQUE and (f not in base or base[f] != v)}
        if diff:
            delta[key] = diff
    if delta and len(json.dumps(delta)) > MAX_CALLBACKS_BYTES:
        raise ValueError(
            f"the callback state differing from the stored step is larger than {MAX_CALLBACKS_BYTES} bytes"
        )
    return delta


def apply_callbacks(state: dict[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with a pointer's callbacks delta put back over ``state["callbacks"]`` (copies
    the dicts it changes; ``state`` is not modified)."""
    callbacks = state.get("callbacks")
    if not delta or not isinstance(callbacks, dict):
        return state
    callbacks = dict(callbacks)
    for key, fields in delta.items():
        target = callbacks.get(key)
        if target is None:
            callbacks[key] = {f: _decode(v) for f, v in fields.items()}
        elif isinstance(target, dict):
            callbacks[key] = {**target, **{f: _decode(v) for f, v in fields.items()}}
    return {**state, "callbacks": callbacks}
