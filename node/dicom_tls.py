"""DICOM TLS (PS3.15 B.1, the Basic TLS Secure Transport Connection Profile, TLS 1.2 or later).

The listener serves its TLS port with `server_context`; delivery opens `tls:` destinations with
`client_context`. Both present the node's certificate (`[listener] tls_cert`, `tls_key`) and,
with `tls_ca`, verify the peer's certificate against those CAs: the listener then refuses a client
without a certificate they signed; delivery checks a server's certificate and host name against
`tls_ca`, or the system's CA store when it is not set.
"""
from __future__ import annotations

import ssl

from ichnode.common.config import ListenerSection


def _restrict(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_context(listener: ListenerSection) -> ssl.SSLContext:
    context = _restrict(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(listener.tls_cert, listener.tls_key)
    if listener.tls_ca is not None:
        context.load_verify_locations(cafile=listener.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(listener: ListenerSection) -> ssl.SSLContext:
    context = _restrict(ssl.create_default_context(cafile=listener.tls_ca))
    if listener.tls:
        context.load_cert_chain(listener.tls_cert, listener.tls_key)
    return context
