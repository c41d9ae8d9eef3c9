"""STOW-RS receive on the node's API (in process): the C-STORE intake behind the multipart parser,
the Store Instances Response, and the requests it refuses."""
from __future__ import annotations

from io import BytesIO
from xml.etree.ElementTree import fromstring

import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread
from pydicom.uid import RLELossless
from pynetdicom.sop_class import MRImageStorage, XRayRadiationDoseSRStorage

from ichnode.common.config import load_settings
from node.api import create_app
from node.spool import Spool
from node.store import Store
from tests.helpers import ct_instance, new_uid


TOKEN = "stow-test-token"
BOUNDARY = "ichnode-test-boundary"
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart_related(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    """A STOW-RS request body written out by hand, to test the node's parser on its own."""
    body = b"".join(b"--%s\r\nContent-Type: %s\r\n\r\n%s\r\n" % (BOUNDARY.encode(), part_type.encode(), part)
                    for part in parts)
    return body + b"--%s--\r\n" % BOUNDARY.encode()


@pytest.fixture
def node_api_with(tmp_path):
    """The node's API in process, configured by environment variables: (client, store, spool)."""
    stores: list[Store] = []

    def make(**env: str):
        settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_API_TOKEN": TOKEN, **env})
        stores.append(Store(settings.storage.database_path))
        client = TestClient(create_app(stores[-1], settings, {}), headers={"Authorization": f"Bearer {TOKEN}"})
        return client, stores[-1], Spool(settings.storage.spool_dir)

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def node_api(node_api_with):
    return node_api_with()


def stow(client: TestClient, *datasets_or_bytes, url: str = "/dicom-web/studies", **headers):
    parts = [part if isinstance(part, bytes) else part10(part) for part in datasets_or_bytes]
    return client.post(url, content=multipart_related(*parts),
                       headers={"Content-Type": STOW_CONTENT_TYPE, **headers})


def by_sop(response_json: dict, sequence: str) -> dict[str, Dataset]:
    ds = Dataset.from_json(response_json)
    return {str(item.get("ReferencedSOPInstanceUID")): item for item in ds.get(sequence, [])}


def test_stow_stores_through_the_c_store_path_and_keeps_duplicates_once(node_api):
    client, store, spool = node_api
    series = new_uid()
    instances = [ct_instance(series, i) for i in range(3)]
    first = stow(client, *instances)
    assert first.status_code == 200 and first.headers["content-type"] == "application/dicom+json"
    assert set(by_sop(first.json(), "ReferencedSOPSequence")) == {ds.SOPInstanceUID for ds in instances}
    assert "00081198" not in first.json()  # no FailedSOPSequence
    assert store.series(series).instance_count == 3 and store.series(series).state == "receiving"
    stored = dcmread(spool.path_for(instances[0].StudyInstanceUID, series, instances[0].SOPInstanceUID))
    assert stored.pixel_array.shape == (16, 16)

    again = stow(client, *instances)  # the same SOP Instance UIDs: accepted, stored once
    assert again.status_code == 200
    assert len(by_sop(again.json(), "ReferencedSOPSequence")) == 3
    assert store.series(series).instance_count == 3 and len(spool.files()) == 3


def test_stow_answers_each_refused_instance_with_its_failure_reason(node_api_with):
    client, store, spool = node_api_with(ICHNODE_ACCEPT_ALL_STORAGE="false")
    series = new_uid()
    good = ct_instance(series, 0)
    no_pixels = ct_instance(series, 1, pixels=False)
    mr = ct_instance(series, 2, sop_class=MRImageStorage)
    no_study = ct_instance(series, 3, study_uid="")  # an empty required UID: the one UID refusal left
    response = stow(client, good, no_pixels, mr, no_study, b"not DICOM at all")
    assert response.status_code == 202
    assert set(by_sop(response.json(), "ReferencedSOPSequence")) == {good.SOPInstanceUID}
    failed = by_sop(response.json(), "FailedSOPSequence")
    assert {uid: item.FailureReason for uid, item in failed.items()} == {
        no_pixels.SOPInstanceUID: 0xA900, mr.SOPInstanceUID: 0x0122, no_study.SOPInstanceUID: 0xA900,
        "None": 0xC000}
    assert failed[mr.SOPInstanceUID].ReferencedSOPClassUID == MRImageStorage
    assert spool.files() == [spool.path_for(good.StudyInstanceUID, series, good.SOPInstanceUID)]

    none_stored = stow(client, no_pixels)
    assert none_stored.status_code == 409
    assert by_sop(none_stored.json(), "FailedSOPSequence")[no_pixels.SOPInstanceUID].FailureReason == 0xA900


def test_stow_takes_other_storage_classes_counts_them_and_never_analyses_them(node_api):
    client, store, spool = node_api
    series = new_uid()
    ct, mr = ct_instance(series, 0), ct_instance(series + ".2", 0, sop_class=MRImageStorage)
    dose = ct_instance(series + ".3", 0, sop_class=XRayRadiationDoseSRStorage, pixels=False)  # no Pixel Data
    response = stow(client, ct, mr, dose, mr)  # the MR twice: counted once
    assert response.status_code == 200
    assert set(by_sop(response.json(), "ReferencedSOPSequence")) == {ct.SOPInstanceUID, mr.SOPInstanceUID,
                                                                    dose.SOPInstanceUID}
    assert store.other_objects(ct.StudyInstanceUID) == 2 and store.series(series + ".2") is None
    assert spool.files() == [spool.path_for(ct.StudyInstanceUID, series, ct.SOPInstanceUID)]  # discarded
    assert client.get(f"/api/studies/{ct.StudyInstanceUID}").json()["other_objects"] == 2
    metrics = client.get("/metrics").text
    assert 'ichnode_other_objects_total{action="discarded",sop_class="MR Image Storage"}' in metrics


def test_other_objects_are_kept_in_the_spool_when_configured(node_api_with):
    client, store, spool = node_api_with(ICHNODE_OTHER_OBJECTS="keep")
    mr = ct_instance(new_uid(), 0, sop_class=MRImageStorage)
    assert stow(client, mr).status_code == 200
    assert spool.files() == [spool.path_for(mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.SOPInstanceUID)]
    assert store.other_objects(mr.StudyInstanceUID) == 1 and store.study(mr.StudyInstanceUID) is None


@pytest.mark.filterwarnings("ignore:.*for VR UI")  # pydicom's, as the test writes such UIDs
def test_stow_keeps_uids_outside_the_grammar_exactly_as_received(node_api):
    client, store, spool = node_api
    study, series = "63b4b5296cbcf3c5fcd0e380bf99c7cb", "1.2.03.4"  # hex; leading zero
    instances = [ct_instance(series, 0, study_uid=study), ct_instance(series, 1, study_uid=study)]
    instances[1].SOPInstanceUID = "1.2.826.0." + "1234567890." * 6 + "7"  # 76 characters
    response = stow(client, *instances, url=f"/dicom-web/studies/{study}")
    assert response.status_code == 200
    assert set(by_sop(response.json(), "ReferencedSOPSequence")) == {ds.SOPInstanceUID for ds in instances}
    assert {i.sop_uid for i in store.instances(series)} == {ds.SOPInstanceUID for ds in instances}
    assert store.study(study).study_uid == study and store.series(series).instance_count == 2
    assert all(study not in str(path) and series not in str(path) for path in spool.files())


def test_stow_to_a_study_refuses_instances_of_another_study(node_api):
    client, store, spool = node_api
    series = new_uid()
    ours = ct_instance(series, 0, study_uid="1.2.826.0.1.3680043.8.498.7")
    theirs = ct_instance(series + ".9", 1, study_uid="1.2.826.0.1.3680043.8.498.8")
    response = stow(client, ours, theirs, url="/dicom-web/studies/1.2.826.0.1.3680043.8.498.7")
    assert response.status_code == 202
    assert set(by_sop(response.json(), "ReferencedSOPSequence")) == {ours.SOPInstanceUID}
    assert by_sop(response.json(), "FailedSOPSequence")[theirs.SOPInstanceUID].FailureReason == 0xA900
    assert len(spool.files()) == 1


def test_stow_answers_in_xml_to_a_client_that_accepts_only_xml(node_api):
    client, store, spool = node_api
    good, refused = ct_instance(new_uid(), 0), ct_instance(new_uid(), 0, pixels=False)
    response = stow(client, good, refused, Accept="application/dicom+xml")
    assert response.status_code == 202 and response.headers["content-type"] == "application/dicom+xml"
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    root = fromstring(response.content)
    failed = root.find("d:DicomAttribute[@keyword='FailedSOPSequence']/d:Item", ns)
    assert failed.find("d:DicomAttribute[@tag='00081155']/d:Value", ns).text == refused.SOPInstanceUID
    assert failed.find("d:DicomAttribute[@keyword='FailureReason']", ns).get("vr") == "US"
    assert failed.find("d:DicomAttribute[@keyword='FailureReason']/d:Value", ns).text == str(0xA900)
    stored = root.find("d:DicomAttribute[@keyword='ReferencedSOPSequence']/d:Item", ns)
    assert stored.find("d:DicomAttribute[@keyword='ReferencedSOPInstanceUID']/d:Value", ns).text == good.SOPInstanceUID


@pytest.mark.parametrize("headers, body, status, reason", [
    ({"Authorization": "Bearer wrong"}, None, 401, "bearer token"),
    ({"Content-Type": "application/dicom"}, None, 415, "multipart/related"),
    ({"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=x'}, None, 415, "multipart/related"),
    ({"Content-Type": 'multipart/related; type="application/dicom"'}, None, 400, "no boundary"),
    ({"Accept": "image/png"}, None, 406, "application/dicom+json"),
    ({}, multipart_related(), 400, "no instance"),
    ({}, multipart_related(b"x" * 100)[:-20], 400, "closing boundary"),
])
def test_stow_refuses_requests_it_cannot_take_with_the_reason(node_api, headers, body, status, reason):
    client, store, spool = node_api
    default_body = multipart_related(part10(ct_instance(new_uid(), 0)))
    response = client.post("/dicom-web/studies", content=default_body if body is None else body,
                           headers={"Content-Type": STOW_CONTENT_TYPE, **headers})
    assert response.status_code == status and reason in response.json()["detail"]
    assert spool.files() == []


def declared_length_past_the_end(ds: Dataset) -> bytes:
    """The Part 10 bytes of `ds` with its Pixel Data length field 1000 bytes longer than what follows."""
    data = bytearray(part10(ds))
    at = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")  # (7FE0,0010) OW, 2 reserved bytes, then a 4-byte length
    length = int.from_bytes(data[at + 8:at + 12], "little")
    data[at + 8:at + 12] = (length + 1000).to_bytes(4, "little")
    return bytes(data)


def cut_fragment(ds: Dataset) -> Dataset:
    """RLE Pixel Data whose one fragment declares 16 bytes more than the element holds."""
    ds.compress(RLELossless)
    pixel_data = bytearray(ds.PixelData)
    at = 8 + int.from_bytes(pixel_data[4:8], "little")  # after the Basic Offset Table item
    length = int.from_bytes(pixel_data[at + 4:at + 8], "little")
    pixel_data[at + 4:at + 8] = (length + 16).to_bytes(4, "little")
    ds.PixelData = bytes(pixel_data)
    return ds


def test_stow_refuses_instances_cut_short_with_the_reason(node_api, caplog):
    client, store, spool = node_api
    series = new_uid()
    past_end, fragment = ct_instance(series, 0), cut_fragment(ct_instance(series, 1))
    with caplog.at_level("WARNING", logger="ichnode.intake"):
        response = stow(client, declared_length_past_the_end(past_end), fragment)
    assert "(0xC000): (7FE0,0010) declares 1512 bytes, 512 follow" in caplog.text
    assert "(0xC000): Pixel Data: fragment of" in caplog.text
    assert response.status_code == 409
    failed = by_sop(response.json(), "FailedSOPSequence")
    assert {uid: item.FailureReason for uid, item in failed.items()} == {
        past_end.SOPInstanceUID: 0xC000, fragment.SOPInstanceUID: 0xC000}
    assert spool.files() == []


def test_stow_and_the_listener_share_one_free_space_check_so_a_shortage_is_logged_once(tmp_path, caplog):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_API_TOKEN": TOKEN,
                                      "ICHNODE_MIN_FREE_MB": str(10 ** 12)})  # more than any disk has
    spool = Spool(settings.storage.spool_dir, settings.storage.min_free_bytes)
    store = Store(settings.storage.database_path)
    try:
        assert spool.free_space.shortage()  # the listener's intake or the assembly loop found the shortage
        client = TestClient(create_app(store, settings, {}, spool), headers={"Authorization": f"Bearer {TOKEN}"})
        response = stow(client, ct_instance(new_uid(), 0))
        assert response.status_code == 409
        assert next(iter(by_sop(response.json(), "FailedSOPSequence").values())).FailureReason == 0xA700
    finally:
        store.close()
    assert caplog.text.count("instances are refused (0xA700)") == 1
