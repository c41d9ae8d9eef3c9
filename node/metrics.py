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
GROUP_COMMIT_SIZE = Histogram("ichnode_intake_group_commit_instances", "Instances made durable together by one "
                              "fsync of their folders and one store commit", buckets=(1, 2, 4, 8, 16, 32, 64))
STAGE_SECONDS = Histogram("ichnode_series_stage_seconds", "Latency of an analysed series per stage, from its last "
                          "instance received to its results acknowledged (node/latency.py)", ["stage"],
                          buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 600))
SERIES_COMPLETED = Counter("ichnode_series_completed_total", "Series found complete, by what told: quiet (no "
                           "instance for quiet_seconds), count_hint (Images in Acquisition reached) or "
                           "association_release (its sender released the association)", ["by"])
SERIES_WAITING_FOR_BROKER = Gauge("ichnode_series_waiting_for_broker", "Queued series the broker has not taken yet")
DISK_FREE_BYTES = Gauge("ichnode_disk_free_bytes", "Free space on the file system of storage.data_dir")
DISK_BELOW_MIN_FREE = Gauge("ichnode_disk_below_min_free", "1 while free space is below storage.min_free_mb: "
                            "instances are refused with 0xA700")
CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition() -> str:
    """Every metric in the Prometheus text format."""
    return generate_latest().decode()
