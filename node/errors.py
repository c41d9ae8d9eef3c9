"""Errors and per-object outcomes shared by the node's delivery channels."""
from __future__ import annotations

from dataclasses import dataclass


class DeliveryError(Exception):
    """A result could not be delivered; the message says to whom and why. The outbox retries."""


@dataclass(frozen=True)
class Outcome:
    """One result object at one destination: stored when `error` is None (perhaps with the
    destination's `warning`), otherwise not stored, for the reason in `error`."""

    error: str | None = None
    warning: str | None = None
