"""Token-level metrics in Prometheus format, named as vLLM names them (prefix ``toolkit:``) so that dashboards
and ``vllm bench serve`` built for vLLM read them.

Every interval comes from ``time.perf_counter`` in this one process and starts at the request's ARRIVAL (before
its prompt is tokenized), not at its scheduling: a request that waits for a cache row shows the wait in its TTFT.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from toolkit.runtime import SpecStats

PREFIX = "toolkit:"
# CPU decode takes milliseconds per token: the first bucket is 1 ms, so a 7 ms token lands in (5 ms, 7.5 ms]
BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
           0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


class Metrics:
    """One registry per server (not the process-global one), so two servers in one process never share counts."""

    def __init__(self, model_name: str, max_draft_tokens: int = 0) -> None:
        """max_draft_tokens: the server's longest draft; with 0 (no speculation) the spec_decode counters are left
        out, as vLLM leaves them out."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        label = ["model_name"]

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, label, buckets=BUCKETS, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to the first token sent")
        self.itl = histogram("inter_token_latency_seconds", "Between two consecutive tokens of one request")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the last token sent")
        self.queue = histogram("request_queue_time_seconds", "Arrival to the grant of a cache row")
        self.prefill = histogram("request_prefill_time_seconds", "Grant of a cache row to the first token")
        self.decode = histogram("request_decode_time_seconds", "First token to the last token")
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", label,
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", label,
                                         registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "Requests finished, by finish reason",
                               [*label, "finished_reason"], registry=self.registry)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests holding a cache row", label,
                             registry=self.registry)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests admitted and not yet holding a cache row",
                             label, registry=self.registry)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_perc", "Fraction of the cache blocks reserved (0 to 1)",
                              label, registry=self.registry)
        self.spec_decode = SpecDecodeCounters(self.registry, model_name, max_draft_tokens) if max_draft_tokens else None

    def watch(self, running: Callable[[], float], waiting: Callable[[], float], kv_usage: Callable[[], float]) -> None:
        """Gauges read at scrape time, so they can never be stale."""
        for gauge, read in ((self.running, running), (self.waiting, waiting), (self.kv_usage, kv_usage)):
            gauge.labels(self.model_name).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SpecDecodeCounters:
    """vLLM's spec_decode_* counters (its ``v1/spec_decode/metrics.py``), summed over requests as their drafts are
    verified. Rates over them give what vLLM's dashboards show: acceptance = accepted / draft tokens, mean
    acceptance length = 1 + accepted / drafts, acceptance at position i = accepted_per_pos{position=i} / drafts."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_draft_tokens: int) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + "spec_decode_" + name, doc, ["model_name"], registry=registry)

        self.drafts = counter("num_drafts", "Number of spec decoding drafts.").labels(model_name)
        self.draft_tokens = counter("num_draft_tokens", "Number of draft tokens.").labels(model_name)
        self.accepted = counter("num_accepted_tokens", "Number of accepted tokens.").labels(model_name)
        per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
                          ["model_name", "position"], registry=registry)
        self.accepted_per_pos = [per_pos.labels(model_name, str(i)) for i in range(max_draft_tokens)]

    def add(self, stats: SpecStats, counted: SpecStats) -> None:
        """Count what a request's ``stats`` hold beyond ``counted`` (its part counted before), and record them there."""
        self.drafts.inc(stats.num_drafts - counted.num_drafts)
        self.draft_tokens.inc(stats.num_draft_tokens - counted.num_draft_tokens)
        self.accepted.inc(stats.num_accepted_tokens - counted.num_accepted_tokens)
        before = counted.num_accepted_tokens_per_pos + [0] * len(stats.num_accepted_tokens_per_pos)
        for pos, n in enumerate(stats.num_accepted_tokens_per_pos):  # never longer than the server's longest draft
            self.accepted_per_pos[pos].inc(n - before[pos])
        counted.num_drafts, counted.num_draft_tokens = stats.num_drafts, stats.num_draft_tokens
        counted.num_accepted_tokens = stats.num_accepted_tokens
        counted.num_accepted_tokens_per_pos = list(stats.num_accepted_tokens_per_pos)
