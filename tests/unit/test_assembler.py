"""Series completion, selection and re-analysis, on a real Store with a recording queue."""
from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from ichnode.common.config import load_settings
from node.assembler import SeriesAssembler
from node.dispatcher import Dispatcher
from node.store import Store
from tests.helpers import STUDY_UID, findings_for, header


class PendingResult:
    state = "PENDING"


class RecordingCelery:
    def __init__(self):
        self.sent: list[tuple] = []

    def send_task(self, name, args, task_id):
        self.sent.append((name, args, task_id))

    def AsyncResult(self, task_id):
        return PendingResult()


@pytest.fixture
def node(tmp_path):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path), "ICHNODE_QUIET_SECONDS": "10"})
    store = Store(settings.storage.database_path)
    celery = RecordingCelery()
    dispatcher = Dispatcher(store, settings, celery, on_result=lambda *a: None)
    assembler = SeriesAssembler(store, settings, dispatcher.dispatch)
    yield store, assembler, celery, dispatcher
    store.close()


def receive(store, series, count, **kwargs):
    for i in range(count):
        store.record_instance(header(series, i, **kwargs), f"{STUDY_UID}/{series}/{series}.{i + 1}.dcm", "SCANNER")


def test_complete_after_quiet_period_then_queued_with_paths(node):
    store, assembler, celery, _ = node
    receive(store, "1.2.3.4", 30)
    assembler.tick(time.time() + 2)
    assert celery.sent == [] and store.series("1.2.3.4").state == "receiving"
    assembler.tick(time.time() + 11)
    assert store.series("1.2.3.4").state == "queued"
    (name, (uid, generation, paths), task_id), = celery.sent
    assert uid == "1.2.3.4" and generation == 1 and len(paths) == 30 and task_id.endswith("-g1")


def test_count_hint_and_continuous_positions_finish_early(node):
    store, assembler, celery, _ = node
    receive(store, "1.2.3.4", 30, hint=30)
    assembler.tick(time.time() + 1.5)
    assert store.series("1.2.3.4").state == "queued"


def completions(by: str) -> float:
    return REGISTRY.get_sample_value("ichnode_series_completed_total", {"by": by}) or 0.0


def test_what_told_a_series_was_complete_is_kept_and_counted(node):
    store, assembler, celery, _ = node
    before = {by: completions(by) for by in ("quiet", "count_hint")}
    receive(store, "1.2.3.4", 30, hint=30)
    receive(store, "1.2.3.5", 30, kernel="H70h", study="1.2.3.99")
    assembler.tick(time.time() + 1.5)
    assembler.tick(time.time() + 11)
    assert store.series("1.2.3.4").completed_by == "count_hint" and store.series("1.2.3.5").completed_by == "quiet"
    assert completions("count_hint") == before["count_hint"] + 1 and completions("quiet") == before["quiet"] + 1


def test_released_association_that_brought_the_whole_series_finishes_it_early(node):
    store, assembler, celery, _ = node
    receive(store, "1.2.3.4", 30)  # no count hint
    assembler.tick(time.time() + 1.5)
    assert store.series("1.2.3.4").state == "receiving"  # nothing tells yet
    assembler.association_released({"1.2.3.4": 30})
    assembler.tick(time.time() + 1.5)
    series = store.series("1.2.3.4")
    assert series.state == "queued" and series.completed_by == "association_release"


@pytest.mark.parametrize("case", ["part of the series", "instance after the release", "too few slices", "gap",
                                  "within the settle time"])
def test_association_release_does_not_finish_a_series_that_may_still_grow(node, case):
    store, assembler, celery, _ = node
    count = 10 if case == "too few slices" else 30  # min_slices is 16
    for i in range(count):
        z = 5.0 * i + (5.0 if case == "gap" and i >= 15 else 0.0)
        store.record_instance(header("1.2.3.4", i, z=z), f"p{i}", "SCANNER")
    brought = 20 if case == "part of the series" else count  # the other instances came on another association
    assembler.association_released({"1.2.3.4": brought}, at=time.time() - (5 if case == "instance after the release" else 0))
    assembler.tick(time.time() + (0.5 if case == "within the settle time" else 1.5))
    assert store.series("1.2.3.4").state == "receiving"
    assembler.tick(time.time() + 11)  # the quiet period still completes it
    assert store.series("1.2.3.4").completed_by == "quiet"


def test_count_hint_with_a_gap_waits_for_the_quiet_period(node):
    store, assembler, celery, _ = node
    for i in range(30):
        z = 5.0 * i + (5.0 if i >= 15 else 0.0)  # one slice position missing in the middle
        store.record_instance(header("1.2.3.4", i, hint=30, z=z), f"p{i}", "SCANNER")
    assembler.tick(time.time() + 1.5)
    assert store.series("1.2.3.4").state == "receiving"
    assembler.tick(time.time() + 11)
    assert store.series("1.2.3.4").state == "queued"


def test_soft_tissue_kernel_chosen_over_bone_and_the_other_skipped_with_reason(node):
    store, assembler, celery, _ = node
    receive(store, "1.2.3.4", 30, kernel="H70h")
    receive(store, "1.2.3.5", 30, kernel="H30s")
    assembler.tick(time.time() + 11)
    assert store.series("1.2.3.5").state == "queued"
    bone = store.series("1.2.3.4")
    assert bone.state == "skipped" and "1.2.3.5" in bone.reason


def test_selection_waits_for_a_sibling_series_still_arriving(node):
    store, assembler, celery, _ = node
    receive(store, "1.2.3.4", 30, kernel="H70h", hint=30)
    receive(store, "1.2.3.5", 30, kernel="H30s")  # no count hint: complete only when quiet
    assembler.tick(time.time() + 1.5)  # bone series complete early, soft series still arriving
    assert celery.sent == []
    assert store.series("1.2.3.4").completed_at is not None
    assembler.tick(time.time() + 11)
    assert [args[0] for _, args, _ in celery.sent] == ["1.2.3.5"]
    assert store.series("1.2.3.4").state == "skipped"


def test_ineligible_series_is_skipped_with_a_reason(node):
    store, assembler, celery, _ = node
    receive(store, "1.2.3.6", 30, body_part="CHEST")
    receive(store, "1.2.3.7", 3)
    assembler.tick(time.time() + 11)
    assert celery.sent == []
    assert "CHEST" in store.series("1.2.3.6").reason
    assert store.series("1.2.3.7").state == "skipped" and store.series("1.2.3.7").reason


def test_late_instance_triggers_a_new_generation(node):
    store, assembler, celery, _ = node
    receive(store, "1.2.3.4", 30)
    assembler.tick(time.time() + 11)
    assert store.mark_result("1.2.3.4", 1, "done", findings_for(STUDY_UID, "1.2.3.4", 0.1), None)
    store.record_instance(header("1.2.3.4", 30), "late.dcm", "SCANNER")
    assert store.series("1.2.3.4").state == "receiving"
    assembler.tick(time.time() + 11)
    assert [args[1] for _, args, _ in celery.sent] == [1, 2]
    assert len(celery.sent[1][1][2]) == 31
    # a result of the first generation arriving now is recognised as superseded
    assert not store.mark_result("1.2.3.4", 1, "done", findings_for(STUDY_UID, "1.2.3.4", 0.1), None)


def test_pending_task_is_queued_again_when_a_worker_died_after_it_was_queued(node):
    store, assembler, celery, dispatcher = node
    receive(store, "1.2.3.4", 30)
    assembler.tick(time.time() + 11)
    queued_at = store.series("1.2.3.4").queued_at
    dispatcher.poll(worker_died_at=queued_at - 5)  # died before: not ours
    assert len(celery.sent) == 1
    dispatcher.poll(worker_died_at=queued_at + 1)
    assert [args[1] for _, args, _ in celery.sent] == [1, 2]
    assert store.series("1.2.3.4").state == "queued"
