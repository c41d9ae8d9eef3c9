"""The priority reaches the radiologist: studies sent by storescu -> worklist API, web page, HL7, webhook."""
from __future__ import annotations

import re

from node.hl7 import ORDER_PRIORITY
from tests.helpers import ANALYSIS_BUDGET, ack, chromium, done, series_uid_of, study_uid_of, wait_for


def test_positive_study_first_everywhere(node_factory, positive_series, negative_series, listen, receive, tmp_path):
    ris = listen(ack("AA"))
    hook = receive()
    # The test is about order and channels, not the model's operating point. With weights 0.7.0 these
    # 256-px phantoms, sent as DICOM, score p(any) 0.88 (positive) and 0.61 (negative), both URGENT,
    # too close for a probability rule to split safely across weights; their U-Net volumes (9.8 and
    # 0.9 mL) are not, so STAT comes from the volume rule (URGENT and >= 4 mL) with the probability
    # rule out of reach.
    node = node_factory("serve", ICHNODE_WORKERS="1", ICHNODE_HL7_ENDPOINTS=ris.endpoint,
                        ICHNODE_WEBHOOKS=hook.url, ICHNODE_WEBHOOK_MIN_LEVEL="STAT",
                        ICHNODE_STAT_PROBABILITY="1.0", ICHNODE_STAT_VOLUME_ML="4").start()
    # the negative study arrives first: arrival order alone would list it first
    for folder in (negative_series, positive_series):
        assert node.storescu(folder).returncode == 0
        wait_for(lambda: done(node, series_uid_of(folder)), ANALYSIS_BUDGET, what="analysis")
    positive, negative = study_uid_of(positive_series), study_uid_of(negative_series)

    worklist = node.get("/api/worklist")
    assert [item["study_instance_uid"] for item in worklist] == [positive, negative]
    assert worklist[0]["priority"]["level"] == "STAT"
    assert worklist[1]["priority"]["level"] != "STAT"  # so only the positive study fires the webhook
    assert worklist[0]["priority"]["score"] > worklist[1]["priority"]["score"]

    dom = chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{node.http_port}/")
    assert re.findall(r'data-study-uid="([0-9.]+)"', dom) == [positive, negative]
    assert "NOT FOR DIAGNOSTIC USE" in dom

    wait_for(lambda: len(ris.received) == 2, 60, what="two ORU^R01 at the RIS")
    by_accession = {str(m.segment("OBR")(3)).split("^")[0]: m for m in ris.received}
    expected = {item["accession_number"]: ORDER_PRIORITY[item["priority"]["level"]] for item in worklist}
    for accession, priority in expected.items():
        message = by_accession[accession]
        assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
        assert str(message.segment("OBR")(5)) == priority

    wait_for(lambda: len(hook.requests) == 1, 60, what="the webhook for the positive study")
    body = hook.requests[0]["body"]
    assert body["study_instance_uid"] == positive and "patient_name" not in str(body)
