"""Delivery: a persistent outbox of results for PACS (C-STORE or STOW-RS), the RIS (HL7) and webhooks.

`plan_deliveries` puts one outbox row per result object and destination, per HL7 endpoint and per
webhook. `Deliverer.run_once` sends what is due; an item stays pending until its destination
acknowledges it, retried with exponential backoff capped at `delivery_max_backoff_seconds`, so a
PACS that is down for an hour gets its results when it returns and a restart loses nothing.
A `tls:AET@host:port` destination is sent to over DICOM TLS (node/dicom_tls.py). Every item
sent is a line in the audit trail (node/audit.py).
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from ichnode.common.analysis import SeriesFindings
from ichnode.common.config import Destination, ListenerSection, Settings, StowEndpoint, parse_destination
from ichnode.common.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node import audit
from node.dicom_tls import client_context
from node.errors import DeliveryError, Outcome
from node.hl7 import build_oru, send_mllp
from node.latency import observe, stage_seconds
from node.metrics import DELIVERIES
from node.store import DeliveryRow, SeriesRow, Store
from node.stow import send_stow
from node.webhooks import build_webhook_payload, post_webhook, should_notify

log = logging.getLogger("ichnode.delivery")

BACKOFF_BASE_SECONDS = 2.0


def plan_deliveries(store: Store, settings: Settings, series: SeriesRow, generation: int,
                    findings: SeriesFindings) -> None:
    uid = series.series_uid
    study = store.study(series.study_uid)
    for destination in settings.delivery.destinations:
        for path in findings.result_files:
            store.enqueue_delivery(uid, generation, "dicom", str(destination), path)
    if settings.hl7.endpoints:
        message = build_oru(findings, study, settings.hl7.sending_facility)
        for endpoint in settings.hl7.endpoints:
            store.enqueue_delivery(uid, generation, "hl7", str(endpoint), message)
    webhook = settings.webhook
    if webhook.urls and should_notify(findings.priority.level, webhook.min_level):
        payload = json.dumps(build_webhook_payload(findings, study, webhook.include_patient,
                                                   base_url=settings.http.public_url))
        for url in webhook.urls:
            store.enqueue_delivery(uid, generation, "webhook", url, payload)


def send_dicom(listener: ListenerSection, destination: Destination, paths: list[Path]) -> dict[Path, Outcome]:
    """C-STORE the files over one association, as the listener's AE title (and over TLS with its
    certificate for a tls: destination); returns path -> outcome."""
    datasets = {path: dcmread(path) for path in paths}
    ae = AE(ae_title=listener.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets.values()}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (client_context(listener), destination.host) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (peer down or refused)"
        return {path: Outcome(error=f"{destination}: {reason}") for path in paths}
    outcome: dict[Path, Outcome] = {}
    try:
        for path, ds in datasets.items():
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                outcome[path] = Outcome(error=f"{destination}: no C-STORE response (connection lost or timed out)")
                continue
            reason = f"{destination}: C-STORE status 0x{code:04X} {status.get('ErrorComment', '')}".strip()
            if code == 0x0000:
                outcome[path] = Outcome()
            elif 0xB000 <= code <= 0xBFFF:
                outcome[path] = Outcome(warning=reason)
            else:
                outcome[path] = Outcome(error=reason)
    finally:
        assoc.release()
    return outcome


class Deliverer:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings

    def _backoff(self, attempts: int) -> float:
        delay = min(self.settings.delivery.max_backoff_seconds, BACKOFF_BASE_SECONDS * 2 ** attempts)
        return delay * random.uniform(0.8, 1.0)

    def _failed(self, item: DeliveryRow, error: str, now: float) -> None:
        DELIVERIES.labels(channel=item.channel, outcome="failed").inc()
        delay = self._backoff(item.attempts)
        log.warning("delivery %d (%s to %s) failed, attempt %d, next in %.0f s: %s",
                    item.id, item.channel, item.target, item.attempts + 1, delay, error)
        self.store.delivery_failed(item.id, error, now + delay)

    def _sent(self, item: DeliveryRow, warning: str | None = None) -> None:
        DELIVERIES.labels(channel=item.channel, outcome="sent").inc()
        if item.channel == "dicom":
            audit.record("DICOM Instances Transferred", "R", destination=item.target, series_instance_uid=item.series_uid,
                         result_object=Path(item.payload).name)
        else:  # a webhook URL's path may be its secret: the audit names the host
            target = urlsplit(item.target).netloc if item.channel == "webhook" else item.target
            audit.record("Export", "R", channel=item.channel, destination=target, series_instance_uid=item.series_uid)
        if warning:
            log.warning("delivery %d (%s to %s) stored with a warning: %s", item.id, item.channel, item.target,
                        warning)
        self.store.delivery_sent(item.id, warning)
        series = self.store.series(item.series_uid)
        if series is not None and series.generation == item.generation:
            observe(stage_seconds(series, self.store.deliveries(item.series_uid)), "delivery", "total")

    def run_once(self, now: float | None = None) -> int:
        """Send everything due; returns how many items were sent."""
        now = time.time() if now is None else now
        due = self.store.due_deliveries(now)
        sent = 0
        by_destination: dict[str, list[DeliveryRow]] = defaultdict(list)
        for item in due:
            if item.channel == "dicom":
                by_destination[item.target].append(item)
                continue
            try:
                if item.channel == "hl7":
                    send_mllp(item.target, item.payload)
                else:
                    post_webhook(item.target, json.loads(item.payload))
            except DeliveryError as exc:
                self._failed(item, str(exc), now)
                continue
            self._sent(item)
            sent += 1
        for target, items in by_destination.items():
            paths = {self.settings.storage.data_dir / item.payload: item for item in items}
            missing = [p for p in paths if not p.exists()]
            for path in missing:
                self._failed(paths.pop(path), f"result file {path} is missing", now)
            try:
                destination = parse_destination(target)
                if isinstance(destination, StowEndpoint):
                    outcome = send_stow(destination, list(paths), self.settings.delivery)
                else:
                    outcome = send_dicom(self.settings.listener, destination, list(paths))
            except Exception as exc:  # a broken file or socket error: retry later, never drop
                outcome = {path: Outcome(error=f"{target}: {type(exc).__name__}: {exc}") for path in paths}
            for path, result in outcome.items():
                if result.error is None:
                    self._sent(paths[path], result.warning)
                    sent += 1
                else:
                    self._failed(paths[path], result.error, now)
        if sent:
            log.info("delivered %d item(s)", sent)
        return sent
