"""A checkpoint in object storage (``s3://``, ``gs://``, ``az://``, any fsspec URL), read by
byte ranges: only the ranges the output needs are downloaded, so a full training checkpoint's
optimizer state never leaves the store.

Every read is split into parts of at most ``PART_BYTES``, fetched by a pool of
``IN_FLIGHT`` threads shared by all the conversion's workers: that many ranged requests are in
flight at most, whatever the workers ask. On S3 each part's response is streamed straight into
the caller's buffer, so the memory stays what ``batch_mb`` allows. Each part is checked to hold
exactly the bytes asked for: a store that answers short (an object shorter than its listing)
is an error that names the object, never a silent short read.

Retries live in one place, ``FsspecStorage._call``: transient errors (503 SlowDown, reset
connections, timeouts, an endpoint that does not answer) are retried with exponential backoff
for as long as ``experiment.storage_retry_s`` allows (a store restarting, or a minute of
throttling, should not end a conversion hours long), a read resuming at its last good byte.
On S3 botocore's and s3fs's own retries are turned off, so they do not multiply with ours;
other backends keep their own retry policy (gcsfs retries 429 and 5xx itself) and get one
attempt here. An interrupted run (``abort``) sends no more requests and retries none. An
error that remains names the object and the byte range, and says whether the store, the
credentials or the network is at fault.
"""

from __future__ import annotations

import errno
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from converter.errors import ConversionError
from converter.sources.storage import FileInfo, Storage, redacted

log = logging.getLogger(__name__)
# botocore logs where it found the endpoint and the credentials at INFO: noise in every run's
# log, since Hydra's root logger shows INFO.
for _name in ("botocore", "aiobotocore", "s3fs"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

#: The largest ranged request on S3: a window's reads go out as parts this size, side by side.
PART_BYTES = 8 << 20
#: The same for other backends, whose reads return a ``bytes`` per request before it is
#: copied into place: small parts bound that transient memory to IN_FLIGHT x this.
GENERIC_PART_BYTES = 2 << 20
#: Ranged requests in flight at most, across all workers.
IN_FLIGHT = 16
#: The first backoff of a retried request, doubling up to _BACKOFF_MAX_S.
_BACKOFF_S = 0.1
_BACKOFF_MAX_S = 5.0

# The optional extra (pip install -e '.[<extra>]') that brings each protocol's backend.
_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}
# The server's error codes that mean "try again later": throttling, and others.
_THROTTLED_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
}
_TRANSIENT_CODES = _THROTTLED_CODES | {"ServiceUnavailable", "InternalError", "RequestTimeout"}
_DENIED_CODES = {
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}

T = TypeVar("T")


class _ShortRead(Exception):
    """The store sent fewer bytes than a ranged request asked for."""


class _IgnoredRange(Exception):
    """The store sent more bytes than a ranged request asked for: it, or a proxy on the
    way, does not honour HTTP Range requests."""


@dataclass
class _Part:
    """One ranged request: bytes ``[start, end)`` of ``path``, into ``views`` in turn."""

    path: str
    start: int
    views: list[memoryview]

    @property
    def length(self) -> int:
        return sum(len(v) for v in self.views)

    @property
    def end(self) -> int:
        return self.start + self.length

    def after(self, skip: int) -> list[memoryview]:
        """The buffers from the part's byte ``skip`` on."""
        out = []
        for view in self.views:
            if skip < len(view):
                out.append(view[skip:])
            skip = max(0, skip - len(view))
        return out


# What identifies an object's version in fsspec's listings, by backend (S3 and most stores:
# ETag; GCS: generation; versioned buckets: VersionId), and else its modification time.
_VERSIONS = ("ETag", "etag", "generation", "VersionId", "version_id")
_MODIFIED = ("mtime", "LastModified", "last_modified", "updated", "created")
_BY_MODIFIED = tuple(f"{k}=" for k in _MODIFIED)  # how such a version is spelled


class FsspecStorage(Storage):
    """An object store reached through fsspec: ``root`` is the URL's path without protocol."""

    version_kind = "etag"
    remote = True

    def __init__(self, url: str, options: dict[str, Any], retry_s: float) -> None:
        self.protocol = url.split("://", 1)[0].lower()
        self.options = options
        self.fs, self.root = _filesystem(url, self.protocol, options)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self._s3 = "s3" in protocols
        if self._s3:
            self.fs.retries = 1  # s3fs's own loop; ours is the one that retries
        self._retry_s = retry_s if self._s3 else 0.0
        self._aborted = threading.Event()
        self._said_retrying = False
        self._part_bytes = PART_BYTES if self._s3 else GENERIC_PART_BYTES
        self._listed: dict[str, FileInfo] = {}
        self._pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="fetch")
        self._lock = threading.Lock()
        self.bytes_downloaded = 0
        self.requests = 0
        self.retries = 0

    # ---------------------------------------------------------------- Storage

    def display(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def info(self, path: str) -> FileInfo | None:
        found = self._call(path, None, lambda: self.fs.info(path), missing_ok=True)
        return None if found is None else self._entry(found)

    def listdir(self, folder: str) -> list[FileInfo]:
        """The folder as the store lists it now: fsspec caches listings per folder, and a
        second listing (the check that nothing changed during the run) must not be the first."""
        self.fs.invalidate_cache(folder)
        found = self._call(folder, None, lambda: self.fs.ls(folder, detail=True))
        entries = [self._entry(d) for d in found if d["name"].rstrip("/") != folder.rstrip("/")]
        return sorted(entries, key=lambda e: e.name)

    def read_into(self, path: str, offset: int, into: memoryview) -> int:
        return self.read_batch([(path, offset, into)])[0]

    def read_batch(self, reads: Sequence[tuple[str, int, memoryview]]) -> list[int]:
        """Every read split into parts, all of them in flight together (at most IN_FLIGHT at
        once); reads that follow each other in an object share a part (a chunk's archive
        ends where the next one's begins); each read ends where its object ends, as listed."""
        counts = []
        parts: list[_Part] = []
        for path, offset, into in reads:
            view = into.cast("B") if into.format != "B" else into
            n = max(0, min(len(view), self._size(path) - offset))
            counts.append(n)
            for lo in range(0, n, self._part_bytes):
                piece = view[lo : min(n, lo + self._part_bytes)]
                parts.append(_Part(path, offset + lo, [piece]))
        parts.sort(key=lambda p: (p.path, p.start))
        merged: list[_Part] = []
        for part in parts:
            last = merged[-1] if merged else None
            if (
                last is not None
                and last.path == part.path
                and last.end == part.start
                and last.length + part.length <= self._part_bytes
            ):
                last.views += part.views
            else:
                merged.append(part)
        futures = [self._pool.submit(self._fetch, part) for part in merged]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for f in pending:
                f.cancel()
            # Parts still running write into the caller's buffers: wait for them before the
            # caller reuses those buffers for anything else.
            wait(futures)
            raise failed[0].exception()  # type: ignore[misc]
        return counts

    def describe(self) -> dict[str, Any]:
        described = {
            "kind": "object store",
            "protocol": self.protocol,
            "files_identified_by": (
                "each object's size and ETag as listed (or the store's version of it): whole "
                "objects are not downloaded, so they are not hashed; the bytes read are "
                "identified by the XXH3-128 of each source tensor"
            ),
            "bytes_downloaded": self.bytes_downloaded,
            "requests": self.requests,
            "retries": self.retries,
            "storage_options": redacted(self.options),
        }
        if self._s3:
            described["endpoint"] = self._endpoint()
        return described

    def close(self) -> None:
        self.abort()  # whatever is left running retries for no one: the run ended or failed
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------------- listing

    def _entry(self, found: dict[str, Any]) -> FileInfo:
        name = str(found["name"]).rstrip("/")
        is_dir = found.get("type") == "directory"
        version = next((v for k in _VERSIONS if (v := str(found.get(k) or "").strip('"'))), "")
        if not version:  # a store without object versions: its modification time, if any
            version = next((f"{k}={found[k]}" for k in _MODIFIED if found.get(k)), "")
        entry = FileInfo(self.name(name), is_dir, 0 if is_dir else int(found.get("size") or 0),
                         version)  # fmt: skip
        if not is_dir:
            with self._lock:
                self._listed[name] = entry
        return entry

    def _size(self, path: str) -> int:
        """The object's size as listed (a HEAD if it was not)."""
        entry = self._listed.get(path) or self.info(path)
        if entry is None or entry.is_dir:
            raise ConversionError(
                f"{self.display(path)} does not exist (or is a folder), though the step "
                "folder's index names it: the checkpoint changed while being converted. Run "
                "again once it is complete."
            )
        return entry.size

    # ---------------------------------------------------------------- reading

    def _fetch(self, part: _Part) -> None:
        """Fills the part's buffers with its bytes, exactly: a retry asks only for the bytes
        not yet received."""
        filled = [0]

        def got(n: int) -> None:
            filled[0] += n
            with self._lock:
                self.bytes_downloaded += n

        def attempt() -> None:
            start, views = part.start + filled[0], part.after(filled[0])
            if self._s3:
                self._get_s3(part.path, start, views, got)
            else:
                self._get(part.path, start, views, got)
            if filled[0] != part.length:
                raise _ShortRead(f"the store sent {filled[0]} of {part.length} bytes")

        self._call(part.path, (part.start, part.end), attempt)

    def _get(
        self, path: str, start: int, views: list[memoryview], got: Callable[[int], None]
    ) -> None:
        """Any fsspec backend: the bytes as one ``bytes`` (of a part at most), copied in."""
        length = sum(len(v) for v in views)
        data = memoryview(self.fs.cat_file(path, start=start, end=start + length))
        if len(data) > length:
            raise _IgnoredRange(f"the store sent {len(data)} bytes, {length} were asked for")
        at = 0
        for view in views:
            n = min(len(view), len(data) - at)
            view[:n] = data[at : at + n]
            at += n
        got(len(data))

    def _get_s3(
        self, path: str, start: int, views: list[memoryview], got: Callable[[int], None]
    ) -> None:
        """S3: the response body streamed into the buffers (no copy the size of the part);
        the request pinned to the ETag listed, so an object replaced meanwhile is an error,
        not a mix of two versions."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)
        entry = self._listed.get(path)
        # Only an ETag pins: a store without them is versioned by a modification time.
        etag = entry.version if entry and not entry.version.startswith(_BY_MODIFIED) else ""
        pin = {"IfMatch": f'"{etag}"'} if etag else {}
        length = sum(len(v) for v in views)

        async def fill() -> None:
            response = await self.fs._call_s3(
                "get_object",
                Bucket=bucket,
                Key=key,
                Range=f"bytes={start}-{start + length - 1}",
                **pin,
            )
            body = response["Body"]
            try:
                for view in views:
                    filled = 0
                    while filled < len(view):
                        n = await body.readinto(view[filled:])
                        if not n:
                            return  # short: the caller names it
                        filled += n
                        got(n)
                # Reading on at the end checks the body's length (and the checksum, for a
                # whole object); a byte more than asked is a store's error.
                if await body.readinto(bytearray(1)):
                    raise _IgnoredRange("the store sent more bytes than asked for")
            finally:
                body.close()

        sync(self.fs.loop, fill)

    # ---------------------------------------------------------------- retries and errors

    def _call(
        self,
        path: str,
        span: tuple[int, int] | None,
        request: Callable[[], T],
        missing_ok: bool = False,
    ) -> T | None:
        """``request()``, retried with exponential backoff while it fails transiently, for up
        to ``storage_retry_s``; any other failure becomes one paragraph naming the object and
        the byte range. An aborted run sends no more requests."""
        # The budget runs from the first failure: a long read that fails late is retried too.
        failing_since: float | None = None
        last: Exception | None = None
        attempt = 0
        while not self._aborted.is_set():
            attempt += 1
            with self._lock:
                self.requests += 1
            try:
                return request()
            except Exception as e:
                if missing_ok and _kind(e) == "missing":
                    return None
                last = e
                failing_since = failing_since or time.monotonic()
                delay = min(_BACKOFF_MAX_S, _BACKOFF_S * 2 ** min(attempt - 1, 16))
                delay = delay / 2 + random.uniform(0, delay / 2)
                waited = time.monotonic() - failing_since
                if _kind(e) in ("transient", "unreachable") and waited + delay <= self._retry_s:
                    with self._lock:
                        self.retries += 1
                        # Said once, when a request has failed for a while: not stuck.
                        warn = attempt == 4 and not self._said_retrying
                        self._said_retrying |= warn
                    log.log(
                        logging.WARNING if warn else logging.DEBUG,
                        "retrying %s (for up to storage_retry_s=%g s in all) after %s",
                        self.display(path), self._retry_s, _describe(e),
                    )  # fmt: skip
                    self._aborted.wait(delay)
                    continue
                raise self._failure(path, span, e, attempt, waited) from e
        raise ConversionError(
            f"Reading {self.display(path)} was stopped: the run was interrupted, or failed "
            "elsewhere."
        ) from last

    def abort(self) -> None:
        self._aborted.set()

    def _failure(
        self,
        path: str,
        span: tuple[int, int] | None,
        e: BaseException,
        attempts: int,
        seconds: float,
    ) -> ConversionError:
        """The paragraph for a request that failed for good."""
        shown = self.display(path)
        where = f"{shown} (bytes {span[0]}-{span[1] - 1})" if span else shown
        kind = _kind(e)
        why = _describe(e)
        tried = f" after {attempts} attempts over {seconds:.1f} s" if attempts > 1 else ""
        env = "This is a problem of the environment, not of the checkpoint."
        if kind == "client":
            return ConversionError(
                f"Cannot set up the {self.protocol}:// client to read {shown} ({why}); no "
                "request was sent. Check the client settings the environment gives (for S3: "
                "AWS_PROFILE, AWS_ENDPOINT_URL with its http:// or https://, AWS_CONFIG_FILE) "
                "and experiment.storage_options. " + env
            )
        if kind == "archived":
            return ConversionError(
                f"{where} is archived ({why}): its storage class (S3 Glacier, Deep Archive) "
                "serves no bytes until the object is restored. Restore the step folder's "
                "objects (aws s3api restore-object, or a batch restore), then run again. "
                "Nothing was written."
            )
        if kind == "ignored_range":
            return ConversionError(
                f"The object store sent more bytes than asked for {where} ({why}): it, or a "
                "proxy on the way, ignores HTTP Range requests, which this converter reads by "
                f"(only the bytes the output needs). Check the endpoint"
                f"{' ' + self._endpoint() if self._s3 else ''} and any proxy. Nothing was "
                "written. " + env
            )
        if kind == "credentials":
            return ConversionError(
                f"Cannot read {where}: no credentials were found for {self.protocol}:// ({why})."
                f" Give them as the backend's standard environment does (for S3: "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), or in "
                "experiment.storage_options (anon: true for a public bucket). " + env
            )
        if kind == "denied":
            return ConversionError(
                f"Access to {where} was denied ({why}): the credentials in use may not read "
                "it. Check which credentials the environment gives (AWS_PROFILE, "
                "AWS_ACCESS_KEY_ID, ...) and the bucket's policy. " + env
            )
        if kind == "unreachable":
            return ConversionError(
                f"Cannot reach the object store for {where}{tried} ({why}). Check the endpoint"
                f"{' ' + self._endpoint() if self._s3 else ''} (AWS_ENDPOINT_URL, or "
                "experiment.storage_options) and the network. " + env
            )
        if kind == "missing":
            return ConversionError(
                f"{where} does not exist ({why}), though it was listed at the start of this "
                "run: the checkpoint changed while being converted. Run again once it is "
                "complete. Nothing was written."
            )
        if kind == "changed":
            return ConversionError(
                f"{where} changed while being converted (its ETag is no longer the one "
                f"listed: {why}). Nothing was written; run again once the upload is finished."
            )
        if kind == "short":
            return ConversionError(
                f"{where} is shorter than its listing says ({why}): the object was truncated "
                "or replaced while being read. Nothing was written; upload the step folder "
                "again, or convert another step."
            )
        if kind == "transient":
            code, status = _response(e)
            if code in _THROTTLED_CODES or status in (429, 503):
                what = "kept throttling the requests (503 SlowDown)"
            elif status >= 500:
                what = "kept answering with a server error"
            elif {"ReadTimeoutError", "ServerTimeoutError", "TimeoutError"} & _names(e):
                what = "stopped answering (the reads timed out)"
            else:
                what = "kept breaking the connection"
            return ConversionError(
                f"The object store {what} on {where}{tried} ({why}). Nothing was written; run "
                "again later (with fewer workers if it throttles)."
            )
        if kind == "options":
            return _bad_options(self.display(path), e)
        return ConversionError(
            f"Cannot read {where}{tried} ({why}). The object store refused the request; "
            "nothing was written. Check the URL and experiment.storage_options, then run again."
        )

    def _endpoint(self) -> str:
        return str(self.fs.s3.meta.endpoint_url) if self._s3 else ""


def _filesystem(url: str, protocol: str, options: dict[str, Any]) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` (a new instance: an earlier job's cached listings or
    endpoint do not leak into this one), and the URL's path within it."""
    import fsspec

    kwargs: dict[str, Any] = {"skip_instance_cache": True, **options}
    if protocol in ("s3", "s3a"):
        config = dict(kwargs.get("config_kwargs") or {})
        # botocore retries nothing (one attempt); FsspecStorage._call does.
        config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
        config.setdefault("max_pool_connections", IN_FLIGHT + 2)
        kwargs["config_kwargs"] = config
    try:
        fs, root = fsspec.url_to_fs(url, **kwargs)
    except ImportError as e:
        extra = _EXTRAS.get(protocol)
        how = (
            f"pip install -e '.[{extra}]' in titan2tune's folder (the optional extra '{extra}')"
            if extra
            else "install the fsspec backend for it"
        )
        raise ConversionError(
            f"Reading {url} needs fsspec's backend for {protocol}://, which this Python "
            f"environment lacks ({e}). Install it: {how}, then run again. This is a problem of "
            "the environment, not of the checkpoint."
        ) from e
    except ValueError as e:
        if "Protocol not known" in str(e):
            raise ConversionError(
                f"experiment.checkpoint_dir={url} uses the protocol {protocol}://, which fsspec "
                "does not know. Use a local path, or a URL such as s3://bucket/run/checkpoint "
                "or gs://bucket/run/checkpoint."
            ) from e
        raise _bad_options(url, e) from e
    except TypeError as e:
        raise _bad_options(url, e) from e
    return fs, root.rstrip("/")


def _bad_options(url: str, e: BaseException) -> ConversionError:
    return ConversionError(
        f"experiment.storage_options are not accepted by fsspec's backend for {url} "
        f"({type(e).__name__}: {e}). Use the backend's own option names (for S3, those of "
        "s3fs.S3FileSystem: endpoint_url, key, secret, anon, client_kwargs, ...)."
    )


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the errors it was raised from (s3fs translates botocore's into OSErrors)."""
    seen: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _response(e: BaseException) -> tuple[str, int]:
    """A botocore ClientError's error code and HTTP status, from anywhere in the chain."""
    for err in _chain(e):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code, int(status)
    return "", 0


def _names(e: BaseException) -> set[str]:
    """The class names of ``e``, of the errors it was raised from, and of their bases."""
    return {cls.__name__ for err in _chain(e) for cls in type(err).__mro__}


def _kind(e: BaseException) -> str:
    """What a failed request tells: transient, missing, denied, credentials, unreachable,
    changed, short, ignored_range, archived, client, options, or other."""
    chain = _chain(e)
    names = _names(e)
    code, status = _response(e)
    if any(isinstance(err, _IgnoredRange) for err in chain):
        return "ignored_range"
    if any(isinstance(err, _ShortRead) for err in chain) or code == "InvalidRange":
        return "short"
    if code == "InvalidObjectState":  # S3: an archived object, whatever the status says
        return "archived"
    # Set-up that fails before a request: botocore's profile lookup, and its check of the
    # endpoint's URL (a ValueError, told by its message alone).
    if "ProfileNotFound" in names or any(
        type(err) is ValueError and str(err).startswith("Invalid endpoint") for err in chain
    ):
        return "client"
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return "credentials"
    if isinstance(e, TypeError):  # an option the backend's client does not take
        return "options"
    if code == "PreconditionFailed" or status == 412:
        return "changed"
    if code in _DENIED_CODES or status == 403 or isinstance(e, PermissionError):
        return "denied"
    if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
        return "missing"
    if isinstance(e, FileNotFoundError):
        return "missing"
    if {"EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError"} & names:
        return "unreachable"
    if code in _TRANSIENT_CODES or status == 429 or status >= 500:
        return "transient"
    transient = {
        "ClientPayloadError",  # aiohttp: the body broke off (a reset connection)
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ServerTimeoutError",
        "HTTPClientError",  # botocore: ConnectionClosedError, ReadTimeoutError, ...
        "IncompleteReadError",
        "FlexibleChecksumError",
        "ConnectionError",  # builtin: ConnectionResetError, BrokenPipeError
        "TimeoutError",
    }
    if transient & names:
        return "transient"
    if isinstance(e, OSError) and e.errno in (errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT):
        return "transient"
    return "other"


def _describe(e: BaseException) -> str:
    code, status = _response(e)
    text = str(e).strip() or type(e).__name__
    if code:
        return f"{code}, HTTP {status}: {text}" if status else f"{code}: {text}"
    return f"{type(e).__name__}: {text}"
