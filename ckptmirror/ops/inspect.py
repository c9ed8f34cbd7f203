"""``inspect``: the state tree of a step (key paths, dtypes, shapes, bytes), from its manifests only."""

from __future__ import annotations

import base64
import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import CkptMirrorError, ReplicaUnavailableError, StepNotFoundError
from ..format import RankManifest
from ..replicas import Replica
from ..restore.check import validate_manifest
from ..restore.discover import StepListing, list_steps
from ..restore.fetch import Fetcher
from ..state.decode import unflatten
from ._common import UsageError, dotted, opened, walk
from ._engine import Engine, storage_of


@dataclass(frozen=True)
class LeafInfo:
    """A tensor or array as its manifest describes it (no data is read)."""

    kind: str  # "tensor" | "ndarray"
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    nbytes: int  # numel x element size
    storage: int
    storage_bytes: int
    shared: bool  # its storage backs other leaves too (views, tied weights)
    requires_grad: bool
    parameter: bool


@dataclass(frozen=True)
class TreeEntry:
    """One leaf of the state tree: a tensor/array (``leaf``) or a plain value (``value``)."""

    path: tuple[Any, ...]
    name: str  # dotted: "model.fc1.weight", "optim.state.0.exp_avg"
    leaf: LeafInfo | None
    value: Any = None


@dataclass(frozen=True)
class RankTree:
    """The state of one rank."""

    rank: int
    objects: int
    stream_bytes: int
    entries: tuple[TreeEntry, ...]
    tree: Any  # the decoded structure, with LeafInfo in place of tensors


@dataclass(frozen=True)
class InspectReport:
    """What :func:`inspect` found."""

    step: int
    world_size: int
    created_unix: float
    ranks: tuple[RankTree, ...]
    #: replica URL -> how it stores the step (raw and stored bytes, compressed and referenced objects)
    storage: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``ckptmirror inspect --json``); the tree is given as entries."""
        return {
            "step": self.step,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "storage": {u: dict(v) for u, v in self.storage.items()},
            "ranks": [
                {
                    "rank": rt.rank,
                    "objects": rt.objects,
                    "stream_bytes": rt.stream_bytes,
                    "entries": [
                        {
                            "path": [_jsonable(k) for k in e.path],
                            "name": e.name,
                            **({"leaf": dataclasses.asdict(e.leaf)} if e.leaf else {"value": _jsonable(e.value)}),
                        }
                        for e in rt.entries
                    ],
                }
                for rt in self.ranks
            ],
        }


class LongInt(int):
    """An int of the state with more decimal digits than Python converts to text
    (``sys.get_int_max_str_digits()``, 4300 by default; the format stores ints of any size).
    The value is kept; ``str``/``repr`` show its first and last digits and how many there are,
    and ``--json`` gives it exactly, in hex (hex conversion has no such limit)."""

    def digits(self) -> int:
        """Decimal digits of the absolute value (computed without converting to text)."""
        n = abs(int(self))
        d = max(1, int(n.bit_length() * 0.30102999566398120))  # log10(2): off by at most one
        while 10**d <= n:
            d += 1
        while d > 1 and 10 ** (d - 1) > n:
            d -= 1
        return d

    def __repr__(self) -> str:
        n, d = abs(int(self)), self.digits()
        if d <= 2 * _SHOWN:
            return int.__repr__(self)
        head, tail = n // 10 ** (d - _SHOWN), n % 10**_SHOWN
        return f"{'-' if self < 0 else ''}{head}...{tail:0{_SHOWN}d} ({d} digits)"

    __str__ = __repr__


_SHOWN = 12  # leading and trailing digits a LongInt shows


def _too_long(v: int) -> bool:
    """Whether ``str(v)`` would raise (more digits than the interpreter's limit; 0 means none)."""
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    # bit_length * log10(2) <= digits < that + 1: only the borderline needs the exact count.
    return limit > 0 and abs(v).bit_length() * 0.30102999566398120 >= limit - 1 and LongInt(v).digits() > limit


def _printable(node: Any) -> Any:
    """``node`` with every int too long to print (values and dict keys) as a :class:`LongInt`."""
    if isinstance(node, int) and not isinstance(node, bool):
        return LongInt(node) if _too_long(node) else node
    if isinstance(node, dict):
        return {_printable(k): _printable(v) for k, v in node.items()}
    if type(node) in (list, tuple):
        return type(node)(_printable(v) for v in node)
    return node


def _jsonable(v: Any) -> Any:
    """A plain value of the state as JSON; what JSON cannot hold becomes a string (or base64)."""
    if isinstance(v, LongInt):
        return {"int_hex": hex(v), "int_digits": v.digits()}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (bytes, bytearray)):
        return {"bytes_base64": base64.b64encode(bytes(v)).decode("ascii")}
    if hasattr(v, "item") and type(v).__module__.startswith("numpy"):
        return _jsonable(v.item())
    return str(v)


def _choose_step(listing: StepListing, step: int | None) -> int:
    """``step`` if it is committed somewhere, else (when None) the newest committed step."""
    if step is not None:
        if step not in listing.committed:
            raise StepNotFoundError(step, list(listing.committed))
        return step
    if not listing.committed:
        if listing.unreachable:
            raise ReplicaUnavailableError(
                "no replica could be listed: " + "; ".join(f"{u}: {e}" for u, e in listing.unreachable.items())
            )
        raise CkptMirrorError("no committed step on these replicas")
    return max(listing.committed)


def inspect(
    urls: Sequence[str | Replica],
    *,
    step: int | None = None,
    rank: int | None = None,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> InspectReport:
    """The state tree of ``step`` (default: the newest committed): key paths, dtypes, shapes, bytes.

    Reads the commit record and rank manifests (verified against the commit's pins, from any
    replica), never object data. ``rank``: only that rank (default: every rank).
    """
    with opened(urls, storage_options) as replicas:
        listing = list_steps(replicas)
        s = _choose_step(listing, step)
        pool = ThreadPoolExecutor(1)
        try:
            reader = Fetcher(replicas, pool)
            commit = reader.read_commit(s, listing.committed[s])
            if rank is not None and not 0 <= rank < commit.world_size:
                raise UsageError(f"step {s} has ranks 0..{commit.world_size - 1}; there is no rank {rank}")
            ranks: list[RankTree] = []
            for ref in commit.ranks:
                if rank is not None and ref.rank != rank:
                    continue
                m = reader.read_manifest(commit, ref.rank)
                esizes = validate_manifest(m, ref.key).esizes  # the reader's checks; they also size each leaf
                users: dict[int, int] = {}
                for lf in m.leaves:
                    users[lf.storage] = users.get(lf.storage, 0) + 1

                # Defaults bind this iteration's values (unflatten calls it at once; a closure over
                # loop variables would be correct here, but reads as a bug).
                def leaf(
                    kind: str,
                    i: int,
                    path: tuple[Any, ...],
                    m: RankManifest = m,
                    users: dict[int, int] = users,
                    esizes: list[int] = esizes,
                ) -> LeafInfo:
                    lf = m.leaves[i]
                    numel = math.prod(lf.shape)
                    st = m.storages[lf.storage]
                    return LeafInfo(
                        lf.kind,
                        lf.dtype,
                        lf.shape,
                        lf.stride,
                        numel * esizes[i],
                        lf.storage,
                        st.nbytes,
                        users[lf.storage] > 1,
                        lf.requires_grad,
                        lf.parameter,
                    )

                # Ints too long to print in decimal (the format allows any size) print elided.
                tree = _printable(unflatten(m.structure, leaf, ref.key))
                entries = tuple(
                    TreeEntry(
                        p, dotted(p), v if isinstance(v, LeafInfo) else None, None if isinstance(v, LeafInfo) else v
                    )
                    for p, v in walk(tree, (), lambda x: isinstance(x, LeafInfo))
                )
                ranks.append(RankTree(ref.rank, len(m.objects), m.stream_bytes, entries, tree))
            manifests = [reader.read_manifest(commit, ref.rank) for ref in commit.ranks]
            holders = [r for r in replicas if r.url in listing.committed[s]]
            eng = Engine(holders, 1, True, None)
            try:
                storage = {r.url: storage_of(eng, r, s, manifests) for r in holders}
            finally:
                eng.close()
        finally:
            pool.shutdown()
        return InspectReport(s, commit.world_size, commit.created_unix, tuple(ranks), storage)
