"""The peer agent's uploads: ``PUT /v1/o/`` and ``PUT /v1/commit/``, from admission (slots, free
space) through the paced, hashed body to the verified, published object or commit record.

Apart because it is the one path that writes: its limits, its 408/413/422/507 answers and its
temp-file cleanup belong together.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from ..checksum import Hasher, checksum, is_checksum
from ..errors import CkptMirrorError, StepExistsError
from ..format import parse_step_dir
from . import _peer_protocol as wire
from ._agent_admission import Promise, UploadPace
from ._agent_guard import _root_for
from ._agent_log import _event
from ._agent_state import AGENT, CHUNK_BYTES, Agent, _refuse_hidden, _split
from ._peer_protocol import CHECKSUM_HEADER
from ._scrub import MAX_COMMIT_BYTES, Held, check_commit, held_key
from .base import SPACE_ERRNOS, validate_key
from .local import AtomicWriter, LocalReplica


class _UploadCut(web.HTTPRequestTimeout):
    """408 for an upload cut by the agent; ``refusal`` is its reason on ``/metrics``."""

    def __init__(self, refusal: str, text: str) -> None:
        super().__init__(text=text)
        self.refusal = refusal


async def _put(request: web.Request, commit: bool) -> web.Response:
    """``PUT /v1/o/`` (``commit`` False) and ``PUT /v1/commit/``, counted on ``/metrics``."""
    metrics = request.app[AGENT].metrics
    try:
        ns, key = _split(request)
        _refuse_hidden(key, commit_record=commit)  # a commit record only through /v1/commit/
        resp = await _receive(request, ns, key, commit)
    except (web.HTTPException, CkptMirrorError) as exc:
        status = exc.status if isinstance(exc, web.HTTPException) else wire.status_for(exc)
        metrics.upload_failed(status, getattr(exc, "refusal", None), commit)
        raise
    (metrics.commits_accepted if commit else metrics.received_objects).inc()
    return resp


async def _put_object(request: web.Request) -> web.Response:
    return await _put(request, commit=False)


async def _put_commit(request: web.Request) -> web.Response:
    return await _put(request, commit=True)


def _upload_header(agent: Agent, request: web.Request, commit: bool) -> tuple[int, str]:
    """(length, checksum) of an upload, checked before a byte of its body is read."""
    length = request.content_length
    if length is None:
        raise web.HTTPLengthRequired(text="Content-Length is required")
    limit = MAX_COMMIT_BYTES if commit else agent.max_object_bytes
    if length > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=length, text=f"{length} bytes exceeds the limit of {limit}"
        )
    expected = request.headers.get(CHECKSUM_HEADER, "")
    if not is_checksum(expected):
        raise web.HTTPBadRequest(text=f"missing or malformed {CHECKSUM_HEADER}")
    return length, expected


async def _stream_body(
    agent: Agent,
    request: web.Request,
    writer: AtomicWriter,
    length: int,
    *,
    keep: bool,
    ns: str,
    key: str,
    promise: Promise | None = None,
) -> tuple[str, bytes]:
    """Read exactly ``length`` body bytes into ``writer``, hashing them as they pass; what is
    written is taken off ``promise`` (the upload's share of :attr:`Agent.space`).

    Returns (checksum, the body if ``keep`` else ``b""``). A client that sends nothing for the
    idle timeout gets 408, and so does one slower than the minimum rate (:class:`UploadPace`);
    one whose body ends early gets 400. Either way the caller removes the temp file.
    """
    hasher = Hasher()
    body = bytearray() if keep else None
    received = 0
    pace = UploadPace(agent.min_upload_bytes_per_s, agent.upload_rate_window_s, length)
    loop = asyncio.get_running_loop()
    last_data = loop.time()
    while received < length:
        started = loop.time()
        # Wake up at the idle timeout or at the end of the rate window, whichever comes first:
        # a client trickling a byte a second never trips the idle timeout, only the window.
        timeout = min(agent.idle_timeout_s - (started - last_data), pace.time_left())
        chunk: bytes | None = None
        if timeout > 0:
            try:
                # Cancelling a pending read loses no data: aiohttp's reader consumes its buffer
                # only when the read completes.
                chunk = await asyncio.wait_for(request.content.read(min(CHUNK_BYTES, length - received)), timeout)
            except asyncio.TimeoutError:
                pass
        now = loop.time()
        if chunk is None and now - last_data >= agent.idle_timeout_s:
            _event(logging.WARNING, "upload idle, dropped", ns=ns, key=key, received=received, peer=request.remote)
            raise _UploadCut("idle", f"no data for {agent.idle_timeout_s} s")
        if not pace.record(now - started, len(chunk or b"")):
            got = received + len(chunk or b"")
            _event(
                logging.WARNING,
                "upload too slow, cut",
                ns=ns,
                key=key,
                received=got,
                length=length,
                window_bytes=pace.got,
                window_s=pace.window_s,
                min_bytes_per_s=pace.min_bytes_per_s,
                peer=request.remote,
            )
            # The slot is freed and the temp file removed as this propagates (see _receive). The
            # connection is not reset: aiohttp drains what the client still sends for at most
            # 10 s (its "lingering close") and then closes it, so the client can read this 408 (a
            # reset would discard it) while holding no slot and writing nothing to disk.
            raise _UploadCut(
                "rate",
                f"upload too slow: {pace.got} bytes in {pace.window_s:g} s, below the agent's minimum "
                f"of {pace.min_bytes_per_s} bytes/s (--min-upload-bytes-per-s); cut after {got} of "
                f"{length} bytes",
            )
        if chunk is None:
            continue  # the window ended on time: the next one starts
        if not chunk:
            break
        last_data = now
        received += len(chunk)
        agent.metrics.received_bytes.inc(len(chunk))
        if body is not None:
            body += chunk
        await agent.run(_hash_write, hasher, writer, chunk)
        if promise is not None:
            promise.wrote(len(chunk))  # after the write: the free space shows it now
    if received != length:
        raise web.HTTPBadRequest(text=f"body ended after {received} of {length} bytes")
    return hasher.hexdigest(), bytes(body) if body is not None else b""


async def _receive(request: web.Request, ns: str, key: str, commit: bool) -> web.Response:
    """Stream an upload to a temp file, verify it, then publish it (a commit once it is checked)."""
    agent = request.app[AGENT]
    validate_key(key, "agent")
    replica = agent.replica(ns)
    length, expected = _upload_header(agent, request, commit)
    if agent.uploads >= agent.max_uploads:
        raise web.HTTPServiceUnavailable(
            text=f"too many uploads in flight ({agent.max_uploads})", headers={"Retry-After": "1"}
        )
    agent.uploads += 1  # reserve the slot before the first await
    promise: Promise | None = None
    try:
        mark = agent.space.mark()
        free = await agent.run(agent.free_bytes)
        # From here to the promise, no await: the check and the promise are one step of the
        # event loop, so two uploads that fit only one at a time cannot both be admitted.
        others = agent.space.others_since(mark)
        if free - others - length < agent.reserve_free_bytes:
            raise web.HTTPInsufficientStorage(
                text=f"free space {free} minus {others} bytes still to come for the uploads in flight minus "
                f"{length} is below the reserve {agent.reserve_free_bytes} (--reserve-free-bytes) under "
                f"{_root_for(agent, request)}; {_space_fix(request, ns)}"
            )
        promise = agent.space.promise(length)
        try:
            return await _write_upload(agent, request, replica, ns, key, commit, length, expected, promise)
        except OSError as exc:  # a ReplicaError of the local replica carries its errno too
            if exc.errno not in SPACE_ERRNOS:
                raise
            raise await _out_of_space(agent, request, ns, key, length, exc) from exc
    finally:
        agent.uploads -= 1
        if promise is not None:
            promise.release()


async def _write_upload(
    agent: Agent,
    request: web.Request,
    replica: LocalReplica,
    ns: str,
    key: str,
    commit: bool,
    length: int,
    expected: str,
    promise: Promise,
) -> web.Response:
    """The body of an admitted upload: temp file, verify, publish. The temp file is gone
    however this ends (the slot and the promise are the caller's)."""
    writer: AtomicWriter | None = None
    try:
        writer = await agent.run(replica.open_writer, key)
        got, body = await _stream_body(agent, request, writer, length, keep=commit, ns=ns, key=key, promise=promise)
        if got != expected:
            _event(logging.WARNING, "checksum mismatch, dropped", ns=ns, key=key, expected=expected, got=got)
            raise web.HTTPUnprocessableEntity(text=f"checksum mismatch: received {got}, header says {expected}")
        held_written: str | None = None
        if commit:
            writers = _commit_writers(request)
            problems, held = await agent.run(check_commit, replica, ns, key, body, agent.verified, writers)
            if problems:
                raise web.HTTPConflict(text="commit refused: " + "; ".join(problems[:20]))
            if held is not None:
                held_written = await agent.run(_keep_held, replica, key, body, held)
        try:
            await agent.run(writer.finish, commit)
        except StepExistsError:
            writer = None
            # Retrying a commit whose answer was lost must succeed, if it is the same record.
            if not (commit and await agent.run(replica._holds, key, body)):
                if held_written is not None:  # named after our record, which lost: never read
                    await agent.run(replica.delete, held_written)
                raise
            return web.Response(status=201, text="ok (identical commit exists)")
        writer = None
        agent.changed(ns, key)
        if not commit:
            agent.verified[(ns, key)] = (length, expected)
        _event(logging.INFO, "committed" if commit else "stored", ns=ns, key=key, bytes=length)
        return web.Response(status=201, text="ok")
    finally:
        if writer is not None:
            # Before the out-of-space answer is made: its free space must not count the temp file.
            await agent.run(writer.abort)


def _space_fix(request: web.Request, ns: str) -> str:
    """What to do about a full agent, with the command for this namespace."""
    scheme = "peers" if request.secure else "peer"
    return (
        "free space there (delete what is not needed), run 'ckptmirror prune "
        f"{scheme}://{request.host}/{ns} --keep N', or lower keep_last"
    )


async def _out_of_space(
    agent: Agent, request: web.Request, ns: str, key: str, length: int, exc: OSError
) -> web.HTTPInsufficientStorage:
    """The 507 of an upload whose write, fsync or rename found the disk full (``exc``): the
    reserve is only a guess when other writers share the disk, or a quota bounds it."""
    try:
        free: int | str = await agent.run(agent.free_bytes)
    except OSError as err:
        free = f"unknown ({wire.errno_name(err) or err})"
    name = wire.errno_name(exc)
    _event(logging.WARNING, "out of space, upload dropped", ns=ns, key=key, bytes=length, errno=name, free=free)
    return web.HTTPInsufficientStorage(
        text=f"out of space: [{name}] while writing {key} ({length} bytes) under {_root_for(agent, request)}, "
        f"{free} bytes free now; {_space_fix(request, ns)}"
    )


def _commit_writers(request: web.Request) -> frozenset[tuple[int, str]] | None:
    """The writers a commit's client put files for (``wire.WRITERS_HEADER``); None without the header.

    Without it the commit needs every file the record names (the rule for clients that predate the
    header: they expect the agent to vouch for the whole step). With it, the namespace may hold
    only the named writers' share of the step (``_scrub.check_commit``)."""
    value = request.headers.get(wire.WRITERS_HEADER)
    if value is None:
        return None
    try:
        return wire.parse_writers(value)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


def _keep_held(replica: LocalReplica, key: str, body: bytes, held: Held) -> str | None:
    """Write the Held record of the commit record ``body`` (before the record itself becomes
    visible, so that the scrubber never sees the step without it) and return its key; None when
    ``key`` exists already (the commit then ends in 412, or finds an identical record that has
    its own) or is not in a step directory (the scrubber only reads those)."""
    step = parse_step_dir(key.split("/", 1)[0])
    if step is None or replica.size(key) is not None:
        return None
    csum = checksum(body)
    hkey = held_key(step, csum)
    replica.put(hkey, held.to_json(csum))
    return hkey


def _hash_write(hasher: Hasher, writer: Any, chunk: bytes) -> None:
    hasher.update(chunk)
    writer.write(chunk)
