"""The embedded broker: kombu's filesystem transport and Celery's file result backend, with
messages and results written atomically.

kombu writes a message file in place, so a consumer polling the folder can pick it up half
written (an empty payload crashes the Celery worker and loses the message); Celery writes a
result file in place too, so a full disk leaves it cut short, unreadable for good. Here each is
written under a name the reader ignores, fsynced, then renamed into place: a reader sees the
whole file or none (the previous state of a result), and a write that fails leaves nothing.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic

from celery.backends.filesystem import FilesystemBackend
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import ensure_bytes, str_to_bytes
from kombu.utils.json import dumps

SCHEME = "ichnodefs"


def write_atomically(final: str, data: bytes) -> None:
    """Write `data` to `final` whole or not at all (a hidden partial file, fsync, rename)."""
    folder, name = os.path.split(final)
    partial = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(partial, final)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # the same name kombu gives a message: consumers take them in name order
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        try:
            write_atomically(final, str_to_bytes(dumps(payload)))  # the partial name is not *.<queue>.msg: ignored
        except OSError as exc:
            raise ChannelError(f"cannot add message {final!r} to the queue folder: {exc}") from exc


class Transport(filesystem.Transport):
    Channel = Channel


class ResultBackend(FilesystemBackend):
    """Celery's file result backend, each result written atomically."""

    def set(self, key, value):
        write_atomically(os.fsdecode(self._filename(key)), ensure_bytes(value))


def result_backend_url(folder: Path) -> str:
    """Celery's result backend setting for results in `folder`."""
    return f"{__name__}:ResultBackend+file://{folder.resolve()}"


def register() -> str:
    """Make ``SCHEME://`` name this transport for kombu; returns the broker URL."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
    return f"{SCHEME}://"
