"""Errors and per-object outcomes shared by the node's delivery channels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: How an object that was not stored is retried: `unbounded` until the destination stores it (it
#: could not be reached, or did not answer); `bounded` up to delivery.max_attempts (a failure
#: status that may pass, e.g. out of resources); `never` (the destination refused it for good).
Retry = Literal["unbounded", "bounded", "never"]


class DeliveryError(Exception):
    """A result could not be delivered; the message says to whom and why. The outbox retries."""


@dataclass(frozen=True)
class Outcome:
    """One result object at one destination: stored when `error` is None (perhaps with the
    destination's `warning`), otherwise not stored, for the reason in `error`, retried as `retry` says;
    `cause` is the reason in a few words (a label in /metrics: ``status 0xA900``)."""

    error: str | None = None
    warning: str | None = None
    retry: Retry = "unbounded"
    cause: str = "not stored"
