"""The embedded broker never shows a consumer a half-written message."""
from __future__ import annotations

import os
from pathlib import Path

from ichnode.common.config import load_settings
from ichnode.common.queue import ANALYZE_TASK, make_celery


def test_message_appears_only_when_complete(tmp_path, monkeypatch):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path)})
    app = make_celery(settings)
    queue = settings.storage.broker_dir / "queue"
    visible_while_writing: list[list[str]] = []
    real_fsync = os.fsync

    def fsync_and_look(fd):
        visible_while_writing.append([p.name for p in queue.glob("*.msg")])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_and_look)
    app.send_task(ANALYZE_TASK, args=["1.2.3", 1, ["a.dcm"]], task_id="t-1")
    assert visible_while_writing and visible_while_writing[0] == []
    (message,) = queue.glob("*.msg")
    assert message.name.endswith(".ichnode.analyze.msg") and b"t-1" in message.read_bytes()
    assert not [p for p in Path(queue).iterdir() if p.name.endswith(".partial")]
