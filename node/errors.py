"""Errors shared by the node's delivery channels."""


class DeliveryError(Exception):
    """A result could not be delivered; the message says to whom and why. The outbox retries."""
