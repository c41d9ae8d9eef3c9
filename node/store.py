"""`Store`: the node's durable state in one SQLite database under data_dir.

Studies, series (with their state machine), instances, results and the delivery outbox, and the
objects of other SOP classes a study brought (counted, not analysed; their file kept or not). One
connection guarded by a lock: pynetdicom runs each association in its own thread, and SQLite in
WAL mode with short transactions is far faster than the network in front of it. Every commit is
durable (`synchronous=FULL`); `record_received` records a group of received objects in one
transaction (the intake's group commit, node/intake.py).

Series states: receiving -> queued -> analysing -> done | failed | skipped. A late instance puts a
done/queued/analysing series back to receiving, and its next dispatch bumps `generation`, so a
result from an older generation is recognised as superseded. A queued series whose task the
broker has not taken yet has no `sent_at` (it waits for the broker); a failed series with a
`retry_at` is dispatched again then (`attempts` counts the failures since its last result).

Outbox items: pending -> sent | failed. `failed` is final: the destination refused the object (its
SOP class, or a failure status, `refusals` times for a status that may be transient).
"""
from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict

from ichnode.common.analysis import SeriesFindings
from node.headers import InstanceHeader

SeriesState = Literal["receiving", "queued", "analysing", "done", "failed", "skipped"]
Channel = Literal["dicom", "hl7", "webhook"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT, patient_name TEXT, accession_number TEXT,
    study_date TEXT, study_description TEXT,
    received_at REAL NOT NULL,
    acknowledged_at REAL, acknowledged_by TEXT
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    state TEXT NOT NULL,
    reason TEXT,
    modality TEXT, body_part TEXT, description TEXT, protocol TEXT, kernel TEXT,
    images_in_acquisition INTEGER,
    instance_count INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL, last_received_at REAL NOT NULL,
    completed_at REAL, completed_by TEXT, queued_at REAL, started_at REAL, analysed_at REAL,
    generation INTEGER NOT NULL DEFAULT 0,
    task_id TEXT,
    findings TEXT,
    purged_at REAL,
    sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    retry_at REAL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series(study_uid);
CREATE INDEX IF NOT EXISTS series_by_state ON series(state);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    header TEXT NOT NULL,
    calling_aet TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS other_objects (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT,
    calling_aet TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS other_objects_by_study ON other_objects(study_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    refusals INTEGER NOT NULL DEFAULT 0,
    UNIQUE(series_uid, generation, channel, target, payload)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
"""
#: Columns added since the first schema: (table, column, definition), added to older databases at start.
_ADDED_COLUMNS = (
    ("series", "completed_by", "TEXT"),
    ("series", "sent_at", "REAL"),
    ("series", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("series", "retry_at", "REAL"),
    ("outbox", "refusals", "INTEGER NOT NULL DEFAULT 0"),
)


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class StudyRow(_Row):
    study_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    received_at: float
    acknowledged_at: float | None
    acknowledged_by: str | None


class SeriesRow(_Row):
    series_uid: str
    study_uid: str
    state: SeriesState
    reason: str | None  # why it was skipped or failed
    modality: str | None
    body_part: str | None
    description: str | None
    protocol: str | None
    kernel: str | None
    images_in_acquisition: int | None
    instance_count: int
    received_at: float
    last_received_at: float
    completed_at: float | None
    completed_by: str | None  # what told the series was complete: node.assembler.Completion
    queued_at: float | None
    started_at: float | None
    analysed_at: float | None
    generation: int
    task_id: str | None
    findings: SeriesFindings | None  # of the latest analysis; kept while a late instance is received
    purged_at: float | None
    sent_at: float | None  # when the broker took the queued task; None while it waits for the broker
    attempts: int  # failed analyses since the last result
    retry_at: float | None  # a failed series: when it is dispatched again


class InstanceRow(_Row):
    sop_uid: str
    series_uid: str
    sop_class_uid: str
    path: str  # relative to the spool directory
    header: InstanceHeader
    calling_aet: str | None
    received_at: float


class DeliveryRow(_Row):
    """One item of the outbox: a result for one destination."""

    id: int
    series_uid: str
    generation: int
    channel: Channel
    target: str  # AET@host:port, host:port or URL
    payload: str  # dicom: the result file relative to data_dir; hl7: the message; webhook: the JSON body
    state: Literal["pending", "sent", "failed"]
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None
    refusals: int  # failure statuses the destination answered (retried up to delivery.max_attempts)


@dataclass(frozen=True)
class Received:
    """An object the intake spooled (or, for a discarded other object, only counts)."""

    header: InstanceHeader
    path: str | None  # relative to the spool directory; None for a discarded other object
    calling_aet: str
    ct_image: bool


def _insert_instance(db: sqlite3.Connection, item: Received, now: float) -> bool:
    """A new instance for a series that was already dispatched puts it back to receiving."""
    header = item.header
    if db.execute("SELECT 1 FROM instances WHERE sop_uid=?", (header.sop_instance_uid,)).fetchone():
        return False
    db.execute(
        """INSERT INTO studies(study_uid, patient_id, patient_name, accession_number, study_date,
           study_description, received_at) VALUES(?,?,?,?,?,?,?)
           ON CONFLICT(study_uid) DO NOTHING""",
        (header.study_instance_uid, header.patient_id, header.patient_name,
         header.accession_number, header.study_date, header.study_description, now),
    )
    row = db.execute("SELECT state FROM series WHERE series_uid=?", (header.series_instance_uid,)).fetchone()
    if row is None:
        db.execute(
            """INSERT INTO series(series_uid, study_uid, state, modality, body_part, description, protocol,
               kernel, images_in_acquisition, received_at, last_received_at)
               VALUES(?,?,?,?,?,?,?,?,?,?,?)""",
            (header.series_instance_uid, header.study_instance_uid, "receiving", header.modality,
             header.body_part, header.series_description, header.protocol_name,
             header.kernel, header.images_in_acquisition, now, now),
        )
    else:
        # late or continuing instance: the series is (again) being received
        db.execute(
            "UPDATE series SET state='receiving', reason=NULL, last_received_at=? WHERE series_uid=?",
            (now, header.series_instance_uid),
        )
    db.execute(
        """INSERT INTO instances(sop_uid, series_uid, sop_class_uid, path, header, calling_aet, received_at)
           VALUES(?,?,?,?,?,?,?)""",
        (header.sop_instance_uid, header.series_instance_uid, header.sop_class_uid, item.path,
         header.model_dump_json(), item.calling_aet, now),
    )
    db.execute("UPDATE series SET instance_count=instance_count+1 WHERE series_uid=?", (header.series_instance_uid,))
    return True


def _insert_other_object(db: sqlite3.Connection, item: Received, now: float) -> bool:
    header = item.header
    inserted = db.execute(
        """INSERT INTO other_objects(sop_uid, study_uid, series_uid, sop_class_uid, path, calling_aet,
           received_at) VALUES(?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO NOTHING""",
        (header.sop_instance_uid, header.study_instance_uid, header.series_instance_uid,
         header.sop_class_uid, item.path, item.calling_aet, now))
    return inserted.rowcount == 1


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            for table, column, definition in _ADDED_COLUMNS:
                if column not in {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    def _series(self, sql: str, args: tuple = ()) -> list[SeriesRow]:
        return [SeriesRow(**dict(row, findings=SeriesFindings.model_validate_json(row["findings"])
                                 if row["findings"] else None)) for row in self._query(sql, args)]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- receiving -------------------------------------------------------------------------
    def record_instance(self, header: InstanceHeader, path: str, calling_aet: str) -> bool:
        """Record a stored instance; returns False when the SOP Instance UID was already known."""
        return self.record_received([Received(header, path, calling_aet, ct_image=True)])[0]

    def record_other_object(self, header: InstanceHeader, path: str | None, calling_aet: str) -> bool:
        """Count an object that is not a CT image, with its spool path when kept; False when its SOP
        Instance UID was already known."""
        return self.record_received([Received(header, path, calling_aet, ct_image=False)])[0]

    def record_received(self, items: list[Received]) -> list[bool]:
        """Record received objects in one transaction (the intake's group commit); for each, False
        when its SOP Instance UID was already known."""
        now = time.time()
        with self.transaction() as db:
            return [(_insert_instance if item.ct_image else _insert_other_object)(db, item, now) for item in items]

    def other_objects(self, study_uid: str) -> int:
        """How many objects of other SOP classes than CT images the study brought."""
        return self._query("SELECT COUNT(*) AS n FROM other_objects WHERE study_uid=?", (study_uid,))[0]["n"]

    def expired_other_objects(self, received_before: float) -> list[str]:
        """Spool paths of kept other objects received before the cut-off."""
        return [r["path"] for r in self._query(
            "SELECT path FROM other_objects WHERE path IS NOT NULL AND received_at < ?", (received_before,))]

    def forget_other_object_files(self, paths: list[str]) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE other_objects SET path=NULL WHERE path=?", [(p,) for p in paths])

    def spooled_paths(self) -> set[str]:
        """Spool paths the store knows: CT instances and kept other objects."""
        return {r["path"] for r in self._query(
            "SELECT path FROM instances UNION SELECT path FROM other_objects WHERE path IS NOT NULL")}

    def instances(self, series_uid: str) -> list[InstanceRow]:
        rows = self._query("SELECT * FROM instances WHERE series_uid=?", (series_uid,))
        return [InstanceRow(**dict(r, header=InstanceHeader.model_validate_json(r["header"]))) for r in rows]

    # --- series state ----------------------------------------------------------------------
    def series(self, series_uid: str) -> SeriesRow | None:
        rows = self._series("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        return rows[0] if rows else None

    def series_in_state(self, *states: SeriesState) -> list[SeriesRow]:
        marks = ",".join("?" * len(states))
        return self._series(f"SELECT * FROM series WHERE state IN ({marks}) ORDER BY received_at", states)

    def expired_series(self, finished_before: float) -> list[SeriesRow]:
        """Finished series whose files may go: analysed (or skipped) before the cut-off, nothing
        left to deliver, files not yet purged."""
        return self._series(
            """SELECT * FROM series s
               WHERE state IN ('done','failed','skipped') AND purged_at IS NULL
               AND COALESCE(analysed_at, completed_at, last_received_at) < ?
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.series_uid=s.series_uid AND o.state='pending')""",
            (finished_before,))

    def mark_purged(self, series_uid: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE series SET purged_at=? WHERE series_uid=?", (time.time(), series_uid))

    def study_series(self, study_uid: str) -> list[SeriesRow]:
        return self._series("SELECT * FROM series WHERE study_uid=? ORDER BY received_at", (study_uid,))

    def mark_complete(self, series_uid: str, last_received_at: float, by: str) -> bool:
        """Completion seen by the assembler (`by`: what told it); False when an instance arrived meanwhile."""
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE series SET completed_at=?, completed_by=?
                   WHERE series_uid=? AND state='receiving' AND last_received_at=?""",
                (time.time(), by, series_uid, last_received_at),
            )
            return cur.rowcount == 1

    def mark_skipped(self, series_uid: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE series SET state='skipped', reason=? WHERE series_uid=?", (reason, series_uid))

    def mark_queued(self, series_uid: str, task_id: str, last_received_at: float | None = None) -> int | None:
        """Dispatch: bumps the generation. With last_received_at, only if nothing arrived since."""
        with self.transaction() as db:
            sql = ("UPDATE series SET state='queued', reason=NULL, generation=generation+1, task_id=?, queued_at=?, "
                   "started_at=NULL, sent_at=NULL, retry_at=NULL WHERE series_uid=?")
            args: tuple = (task_id, time.time(), series_uid)
            if last_received_at is not None:
                sql += " AND last_received_at=?"
                args += (last_received_at,)
            if db.execute(sql, args).rowcount != 1:
                return None
            return db.execute("SELECT generation FROM series WHERE series_uid=?", (series_uid,)).fetchone()[0]

    def mark_analysing(self, series_uid: str, generation: int, started_at: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE series SET state='analysing', started_at=? WHERE series_uid=? AND generation=? AND state='queued'",
                (started_at, series_uid, generation),
            )

    def mark_result(self, series_uid: str, generation: int, state: SeriesState, findings: SeriesFindings | None,
                    reason: str | None, retry_at: float | None = None) -> bool:
        """Store a finished task's outcome; False when the series moved on (superseded result). A
        failure counts in `attempts` and, with `retry_at`, is dispatched again then."""
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE series SET state=?, reason=?, findings=?, analysed_at=?, retry_at=?,
                   attempts=CASE WHEN ?='failed' THEN attempts+1 ELSE 0 END
                   WHERE series_uid=? AND generation=? AND state IN ('queued','analysing')""",
                (state, reason, findings.model_dump_json() if findings is not None else None, time.time(),
                 retry_at, state, series_uid, generation),
            )
            return cur.rowcount == 1

    def mark_sent(self, series_uid: str, generation: int) -> None:
        """The broker took the queued task."""
        with self.transaction() as db:
            db.execute("UPDATE series SET sent_at=?, reason=NULL "
                       "WHERE series_uid=? AND generation=? AND state='queued'", (time.time(), series_uid, generation))

    def mark_waiting_for_broker(self, series_uid: str, generation: int, reason: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE series SET reason=? WHERE series_uid=? AND generation=? AND state='queued' "
                       "AND sent_at IS NULL", (reason, series_uid, generation))

    def series_waiting_for_broker(self) -> list[SeriesRow]:
        """Queued series whose task the broker has not taken yet."""
        return self._series("SELECT * FROM series WHERE state='queued' AND sent_at IS NULL ORDER BY queued_at")

    def series_due_for_retry(self, now: float) -> list[SeriesRow]:
        """Failed series whose retry time has come."""
        return self._series("SELECT * FROM series WHERE state='failed' AND retry_at<=? ORDER BY retry_at", (now,))

    def retry_series(self, series_uid: str) -> bool:
        """Have a failed series dispatched again now (attempts start over); False when it is not failed."""
        with self.transaction() as db:
            cur = db.execute("UPDATE series SET retry_at=?, attempts=0 WHERE series_uid=? AND state='failed'",
                             (time.time(), series_uid))
            return cur.rowcount == 1

    # --- studies ---------------------------------------------------------------------------
    def study(self, study_uid: str) -> StudyRow | None:
        rows = self._query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return StudyRow(**rows[0]) if rows else None

    def studies(self) -> list[StudyRow]:
        return [StudyRow(**row) for row in self._query("SELECT * FROM studies ORDER BY received_at DESC")]

    def acknowledge(self, study_uid: str, by: str) -> bool:
        with self.transaction() as db:
            cur = db.execute("UPDATE studies SET acknowledged_at=?, acknowledged_by=? WHERE study_uid=?",
                             (time.time(), by, study_uid))
            return cur.rowcount == 1

    # --- outbox ----------------------------------------------------------------------------
    def enqueue_delivery(self, series_uid: str, generation: int, channel: Channel, target: str, payload: str) -> None:
        with self.transaction() as db:
            db.execute(
                """INSERT INTO outbox(series_uid, generation, channel, target, payload, next_attempt_at, created_at)
                   VALUES(?,?,?,?,?,?,?) ON CONFLICT DO NOTHING""",
                (series_uid, generation, channel, target, payload, time.time(), time.time()),
            )

    def due_deliveries(self, now: float, limit: int = 200) -> list[DeliveryRow]:
        return [DeliveryRow(**row) for row in self._query(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt_at<=? ORDER BY id LIMIT ?", (now, limit))]

    def deliveries(self, series_uid: str | None = None) -> list[DeliveryRow]:
        if series_uid:
            rows = self._query("SELECT * FROM outbox WHERE series_uid=? ORDER BY id", (series_uid,))
        else:
            rows = self._query("SELECT * FROM outbox ORDER BY id")
        return [DeliveryRow(**row) for row in rows]

    def delivery_sent(self, item_id: int, warning: str | None = None) -> None:
        """Mark an item sent; the destination's warning, if any, is kept as its last_error."""
        with self.transaction() as db:
            db.execute("UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1, last_error=? WHERE id=?",
                       (time.time(), warning[:500] if warning else None, item_id))

    def delivery_failed(self, item_id: int, error: str, next_attempt_at: float, refused: bool = False) -> None:
        """An attempt that did not store the item; `refused`: the destination answered a failure status."""
        with self.transaction() as db:
            db.execute("UPDATE outbox SET attempts=attempts+1, refusals=refusals+?, last_error=?, next_attempt_at=? "
                       "WHERE id=?", (int(refused), error[:500], next_attempt_at, item_id))

    def delivery_given_up(self, item_id: int, error: str) -> None:
        """The destination refused the item for good: `failed`, never sent again."""
        with self.transaction() as db:
            db.execute("UPDATE outbox SET state='failed', attempts=attempts+1, refusals=refusals+1, last_error=? "
                       "WHERE id=?", (error[:500], item_id))
