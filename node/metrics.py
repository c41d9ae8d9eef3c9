"""Prometheus metrics of the node, served at /metrics."""
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

INSTANCES = Counter("ichnode_instances_received_total", "Received instances (C-STORE, STOW-RS) by outcome", ["outcome"])
OTHER_OBJECTS = Counter("ichnode_other_objects_total", "Received objects that are not CT images, by SOP class "
                        "and what was done with them", ["sop_class", "action"])
SERIES = Counter("ichnode_series_total", "Series reaching a state", ["state"])
DELIVERIES = Counter("ichnode_deliveries_total", "Delivery attempts by channel and outcome: sent, retry (not "
                     "stored, tried again), failed (refused for good)", ["channel", "outcome"])
DELIVERIES_FAILED = Counter("ichnode_deliveries_failed_total", "Result objects a destination refused for good, by "
                            "destination and its reason", ["target", "cause"])
ANALYSIS_SECONDS = Histogram("ichnode_analysis_seconds", "Worker time per analysed series",
                             buckets=(1, 2, 5, 10, 15, 20, 30, 60, 120, 300))
SERIES_WAITING_FOR_BROKER = Gauge("ichnode_series_waiting_for_broker", "Queued series the broker has not taken yet")
DISK_FREE_BYTES = Gauge("ichnode_disk_free_bytes", "Free space on the file system of storage.data_dir")
DISK_BELOW_MIN_FREE = Gauge("ichnode_disk_below_min_free", "1 while free space is below storage.min_free_mb: "
                            "instances are refused with 0xA700")
CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition() -> str:
    """Every metric in the Prometheus text format."""
    return generate_latest().decode()
