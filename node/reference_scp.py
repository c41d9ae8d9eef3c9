"""The least a C-STORE receiver built on pynetdicom can do: the ingest benchmark's ceiling.

    python -m node.reference_scp PORT FOLDER answer   # answer success at once: nothing kept
    python -m node.reference_scp PORT FOLDER fsync    # write each data set as received to a new
                                                      # file and fsync it first (Orthanc's
                                                      # SyncStorageArea), nothing parsed or indexed

ichnode's listener is pynetdicom plus its own work per instance (parse, checks, durable spool and
index, node/intake.py); these two show how much of its time is pynetdicom's own and how close
ichnode is to what any pynetdicom receiver can reach on the machine (docs/PERFORMANCE.md). Same
maximum PDU as ichnode's default. On SIGTERM it writes how many instances it answered to
FOLDER/answered, so the benchmark can check that none was lost.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from ichnode.common.config import ListenerSection

MODES = ("answer", "fsync")


def main(argv: list[str]) -> None:
    port, folder, mode = int(argv[0]), Path(argv[1]), argv[2]
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}, not {mode!r}")
    folder.mkdir(parents=True, exist_ok=True)
    answered: list[str] = []  # list.append is atomic across the associations' threads

    def on_c_store(event) -> int:
        if mode == "fsync":
            fd = os.open(folder / f"{event.request.AffectedSOPInstanceUID}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.write(fd, event.encoded_dataset())
                os.fsync(fd)
            finally:
                os.close(fd)
        answered.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    def on_term(*_) -> None:
        (folder / "answered").write_text(str(len(answered)))
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    ae = AE(ae_title="REFERENCE")
    ae.maximum_pdu_size = ListenerSection().max_pdu_bytes
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_c_store)])


if __name__ == "__main__":
    main(sys.argv[1:])
