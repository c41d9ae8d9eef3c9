"""The embedded broker: kombu's filesystem transport with messages written atomically.

kombu writes a message file in place, so a consumer polling the folder can pick it up half
written (an empty payload crashes the Celery worker and loses the message). Here a message is
written under a name the consumer ignores, fsynced, then renamed into place.
"""
from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

SCHEME = "ichnodefs"


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # the same name kombu gives a message: consumers take them in name order
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")  # not *.<queue>.msg: ignored
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(partial, final)
        except OSError as exc:
            raise ChannelError(f"cannot add message {final!r} to the queue folder: {exc}") from exc


class Transport(filesystem.Transport):
    Channel = Channel


def register() -> str:
    """Make ``SCHEME://`` name this transport for kombu; returns the broker URL."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
    return f"{SCHEME}://"
