"""Prometheus metrics, read from the pipeline at scrape time."""

from __future__ import annotations

from flask import Response, current_app
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class PipelineCollector:
    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def collect(self):
        st = self.pipeline.status()
        yield CounterMetricFamily(
            "fieldscope_frames_classified", "Frames classified", value=st["frames_classified"]
        )
        yield CounterMetricFamily(
            "fieldscope_frames_not_assessable",
            "Frames refused by the quality gate",
            value=st["frames_not_assessable"],
        )
        yield CounterMetricFamily(
            "fieldscope_inference_errors", "Inference errors", value=st["errors"]
        )
        yield GaugeMetricFamily("fieldscope_fps", "Classifications per second", value=st["fps"])
        if st["latency_ms"] is not None:
            yield GaugeMetricFamily(
                "fieldscope_frame_to_result_ms",
                "Median frame-to-result latency",
                value=st["latency_ms"],
            )
        yield GaugeMetricFamily(
            "fieldscope_camera_ok",
            "1 when the camera delivers frames",
            value=float(st["camera"]["state"] == "ok"),
        )
        yield GaugeMetricFamily(
            "fieldscope_storage_ok",
            "1 when results are being stored",
            value=float(st["storage"]["ok"]),
        )
        if st["storage"]["free_mb"] is not None:
            yield GaugeMetricFamily(
                "fieldscope_disk_free_mb",
                "Free disk in the data folder",
                value=st["storage"]["free_mb"],
            )
        yield GaugeMetricFamily(
            "fieldscope_inference_degraded",
            "1 while the CPU stands in for an Edge TPU that failed (it is retried with backoff)",
            value=1.0 if st["backend"].get("degraded") else 0.0,
        )
        outbox = st.get("outbox") or {}
        families = {
            "queued": GaugeMetricFamily("fieldscope_outbox_queued",
                                        "Messages waiting for a destination",
                                        labels=["destination"]),
            "delivered": CounterMetricFamily("fieldscope_outbox_delivered",
                                             "Messages a destination acknowledged",
                                             labels=["destination"]),
            "failed": CounterMetricFamily("fieldscope_outbox_failed",
                                          "Failed tries to reach or send to a destination",
                                          labels=["destination"]),
            "dropped": CounterMetricFamily("fieldscope_outbox_dropped",
                                           "Messages dropped undelivered (too old, too many, "
                                           "refused, or their result removed)",
                                           labels=["destination"]),
        }
        oldest = GaugeMetricFamily("fieldscope_outbox_oldest_age_seconds",
                                   "Age of the oldest undelivered message (0: none waiting)",
                                   labels=["destination"])
        for dest, o in outbox.items():
            for key, fam in families.items():
                fam.add_metric([dest], float(o.get(key, 0)))
            oldest.add_metric([dest], float(o.get("oldest_age_s") or 0.0))
        if outbox:
            yield from families.values()
            yield oldest
        backend = GaugeMetricFamily("fieldscope_backend", "Backend in use", labels=["backend"])
        backend.add_metric([st["backend"]["backend"]], 1.0)
        yield backend


def metrics_view():
    ext = current_app.extensions["fieldscope"]
    registry = ext.get("registry")
    if registry is None:
        registry = CollectorRegistry()
        registry.register(PipelineCollector(ext["pipeline"]))
        ext["registry"] = registry
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
