"""Prometheus metrics of one server (names prefixed crosslm_), on their own registry.

A registry per server keeps tests that run several servers in one process independent.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes_in = Counter("crosslm_bytes_received", "Bundle bytes received in upload chunks", registry=r)
        self.bytes_out = Counter("crosslm_bytes_sent", "Bundle bytes sent in download chunks", registry=r)
        self.active_transfers = Gauge("crosslm_active_transfers", "Upload and download streams in progress",
                                      ["direction"], registry=r)
        self.uploads = Counter("crosslm_uploads", "Uploads finished, by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("crosslm_queue_depth", "Submissions waiting for the worker", registry=r)
        self.stage_seconds = Histogram("crosslm_stage_seconds", "Time spent in each round stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.tokens_per_s = Gauge("crosslm_generation_tokens_per_second", "Latest LLM generation speed",
                                  registry=r)
        self.samples_kept = Counter("crosslm_samples_kept", "Synthetic samples kept by the filter", registry=r)
        self.rounds = Counter("crosslm_rounds", "Rounds finished, by outcome (done, failed)", ["outcome"],
                              registry=r)
        self.slm_accuracy = Gauge("crosslm_slm_heldout_accuracy", "Held-out accuracy a silo reported for its SLM",
                                  ["silo", "task"], registry=r)
        self.llm_accuracy = Gauge("crosslm_llm_zero_shot_accuracy",
                                  "The LLM's raw zero-shot accuracy on the engine's eval_data, latest measurement",
                                  ["task"], registry=r)
        self.llm_perplexity = Gauge("crosslm_llm_perplexity", "The LLM's perplexity on the general corpus, latest "
                                    "measurement", ["task"], registry=r)
        for outcome in ("done", "failed"):
            self.rounds.labels(outcome)
        for direction in ("upload", "download"):
            self.active_transfers.labels(direction)

    def render(self) -> bytes:
        return generate_latest(self.registry)
