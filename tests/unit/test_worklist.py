"""The worklist API on a real Store: reading order, filters, acknowledgement, thumbnails."""
import pytest

from tests.helpers import Site


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


def test_order_priority_then_arrival_with_unanalysed_last(site):
    site.analysed("1.1", "1.1.1", 0.05)  # ROUTINE, earliest
    site.receive("1.2", "1.2.1")  # still receiving
    site.analysed("1.3", "1.3.1", 0.50)  # URGENT
    site.analysed("1.4", "1.4.1", 0.92)  # STAT
    site.analysed("1.5", "1.5.1", 0.35, volume=45.0)  # STAT by volume, lower score than 1.4
    site.analysed("1.6", "1.6.1", 0.50)  # URGENT, same score as 1.3, arrived later
    site.receive("1.7", "1.7.1")
    generation = site.store.mark_queued("1.7.1", "t")
    site.store.mark_result("1.7.1", generation, "failed", None, "analysis failed: RuntimeError: out of memory")

    rows = site.worklist()
    assert [r["study_instance_uid"] for r in rows] == ["1.4", "1.5", "1.3", "1.6", "1.1", "1.2", "1.7"]
    assert [r["priority"]["level"] if r["priority"] else r["state"] for r in rows] == [
        "STAT", "STAT", "URGENT", "URGENT", "ROUTINE", "receiving", "failed"]
    assert rows[-1]["reason"] == "analysis failed: RuntimeError: out of memory"
    assert rows[5]["probabilities"] == {} and rows[5]["timings"]["analysed"] is None


def test_item_carries_what_the_radiologist_needs(site):
    site.analysed("1.4", "1.4.1", 0.92, volume=12.5, thumbnails=(b"png0", b"png1"))
    (item,) = site.worklist()
    assert item["patient_id"] == "PID-1.4" and item["patient_name"] == "DOE^JANE" and item["accession_number"] == "A1"
    assert item["state"] == "done" and item["series_instance_uid"] == "1.4.1"
    assert item["priority"]["level"] == "STAT" and item["priority"]["rationale"].startswith("ICH probability 0.92")
    assert item["probabilities"]["any"] == 0.92 and item["volumes_ml"]["any"] == 12.5
    assert item["difficult"] is False
    assert item["thumbnails"] == ["/api/series/1.4.1/thumbnails/0.png", "/api/series/1.4.1/thumbnails/1.png"]
    assert item["timings"]["received"].endswith("+00:00") and item["timings"]["analysed"].endswith("+00:00")
    assert item["acknowledged"] is None


def test_study_is_shown_through_its_analysed_series(site):
    site.receive("1.4", "1.4.2")
    site.store.mark_skipped("1.4.2", "bone kernel")
    site.analysed("1.4", "1.4.1", 0.8)
    (item,) = site.worklist()
    assert item["series_instance_uid"] == "1.4.1" and item["priority"]["level"] == "STAT"


def test_late_instance_keeps_the_previous_priority_while_receiving(site):
    site.analysed("1.1", "1.1.1", 0.05)
    site.analysed("1.4", "1.4.1", 0.92)
    site.receive("1.4", "1.4.1")  # a late slice: the series is being received again
    rows = site.worklist()
    assert rows[0]["study_instance_uid"] == "1.4"
    assert rows[0]["state"] == "receiving" and rows[0]["priority"]["level"] == "STAT"


def test_filters(site):
    site.analysed("1.1", "1.1.1", 0.05)
    site.analysed("1.4", "1.4.1", 0.92)
    site.receive("1.2", "1.2.1")
    assert [r["study_instance_uid"] for r in site.worklist(level="STAT")] == ["1.4"]
    assert [r["study_instance_uid"] for r in site.worklist(state="receiving")] == ["1.2"]
    assert site.client.get("/api/worklist", params={"level": "HIGH"}).status_code == 422
    assert site.client.get("/api/worklist", params={"state": "lost"}).status_code == 422


def test_acknowledge(site):
    site.analysed("1.1", "1.1.1", 0.05)
    site.analysed("1.4", "1.4.1", 0.92)
    response = site.client.post("/api/studies/1.4/ack", json={"by": " dr.house "})
    assert response.status_code == 200
    assert response.json()["acknowledged"]["by"] == "dr.house"
    rows = site.worklist()
    assert rows[0]["acknowledged"]["by"] == "dr.house" and rows[0]["acknowledged"]["at"].endswith("+00:00")
    assert [r["study_instance_uid"] for r in site.worklist(include_acknowledged="false")] == ["1.1"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/studies/9.9/ack", {"by": "dr"}, 404),
        ("/api/studies/1.4/ack", {}, 422),
        ("/api/studies/1.4/ack", {"by": "   "}, 422),
        ("/api/studies/1.4/ack", {"by": "x" * 65}, 422),
        ("/api/studies/not-a-known-uid/ack", {"by": "dr"}, 404),
    ],
)
def test_acknowledge_rejects_bad_requests(site, path, body, status):
    site.analysed("1.4", "1.4.1", 0.92)
    response = site.client.post(path, json=body)
    assert response.status_code == status
    assert response.json()["detail"]
    assert site.worklist()[0]["acknowledged"] is None


def test_thumbnails(site):
    site.analysed("1.4", "1.4.1", 0.92, thumbnails=(b"png0",))
    response = site.client.get("/api/series/1.4.1/thumbnails/0.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == b"png0"
    missing = site.client.get("/api/series/1.4.1/thumbnails/1.png")
    assert missing.status_code == 404 and missing.json() == {"detail": "no thumbnail 1 for series 1.4.1"}
    assert site.worklist()[0]["thumbnails"] == ["/api/series/1.4.1/thumbnails/0.png"]  # only those on disk
    assert site.client.get("/api/series/1.4.x/thumbnails/0.png").status_code == 404


def test_a_study_with_uids_outside_the_grammar_is_listed_shown_and_acknowledged(site):
    study, series = "63b4b5296cbcf3c5fcd0e380bf99c7cb", "ID_0fe31b044 #2"  # hex; letters, space, '#'
    site.analysed(study, series, 0.92, thumbnails=(b"png0",))
    (row,) = site.worklist()
    assert (row["study_instance_uid"], row["series_instance_uid"]) == (study, series)
    assert row["thumbnails"] == ["/api/series/ID_0fe31b044%20%232/thumbnails/0.png"]
    assert site.client.get(row["thumbnails"][0]).content == b"png0"
    assert site.client.post(f"/api/studies/{study}/ack", json={"by": "dr"}).status_code == 200


@pytest.mark.parametrize("series", ["..", "%2e%2e", "%2E%2E", ".", "1..4", ".1.4", "1.4."])
def test_thumbnail_route_never_leaves_the_series_folder(site, series):
    (site.storage.results_dir).mkdir(parents=True, exist_ok=True)
    (site.storage.results_dir / "thumb_0.png").write_bytes(b"outside")  # what a traversal would serve
    (site.storage.data_dir / "thumb_0.png").write_bytes(b"outside")
    response = site.client.get(f"/api/series/{series}/thumbnails/0.png")
    assert response.status_code in (404, 422)
    assert response.content != b"outside"


def test_openapi_documents_the_worklist(site):
    spec = site.client.get("/openapi.json").json()
    assert "/api/worklist" in spec["paths"] and "/api/studies/{study_uid}/ack" in spec["paths"]
    item = spec["components"]["schemas"]["WorklistItem"]
    assert {"priority", "probabilities", "thumbnails", "acknowledged", "state"} <= set(item["properties"])


def test_page_and_assets_are_served(site):
    page = site.client.get("/")
    assert page.status_code == 200 and "NOT FOR DIAGNOSTIC USE" in page.text
    assert '/static/app.js' in page.text and '/static/style.css' in page.text
    assert site.client.get("/static/app.js").status_code == 200
    assert site.client.get("/static/style.css").status_code == 200
