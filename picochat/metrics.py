"""The server's Prometheus metrics (GET /metrics), through prometheus_client.

    metrics = Metrics(scheduler)            # one per app
    metrics.record("/v1/completions", 200, 0.8)
    metrics.render()                        # bytes in Prometheus' text format

Each app has its own CollectorRegistry: a process may hold several apps (tests do), and a registry refuses a
second metric of a name it has. What it exposes:
  picochat_http_requests_total{path,status}, picochat_http_response_seconds (histogram): every HTTP request;
    paths outside the app's own are counted as "other", /static/* as "/static" (a client cannot grow the series)
  picochat_queue_depth, _active_slots, _slots, _uptime_seconds (gauges), picochat_generations_total,
    _prompt_tokens_total, _generated_tokens_total, _decode_steps_total, _decode_step_seconds_total,
    _scheduler_errors_total, _generations_finished_total{reason} (counters): the scheduler's state, read at
    each scrape from Scheduler.stats (the scheduler counts; this only reads)
  picochat_generation_seconds, picochat_time_to_first_token_seconds (histograms): the scheduler's own
    (Scheduler.latency, Scheduler.ttft), registered here
"""
import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# a <name>_created series next to every counter and histogram would double what Prometheus stores for
# timestamps it can tell from the process start (process-wide, and this process exposes nothing else)
prometheus_client.disable_created_metrics()

KNOWN_PATHS = {"/", "/health", "/info", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}

# the media type /metrics has always answered: 0.0.4 is the text format every Prometheus version scrapes
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """One app's metrics. record() is safe from any thread (prometheus_client's metrics lock themselves)."""

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.requests = Counter("picochat_http_requests", "HTTP requests by path and status.", ["path", "status"],
                                registry=self.registry)
        self.response_time = Histogram("picochat_http_response_seconds", "Time to the start of the response.",
                                       buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30), registry=self.registry)
        self.started = time.time()
        self.registry.register(SchedulerCollector(scheduler, started=self.started))
        self.registry.register(scheduler.latency)
        self.registry.register(scheduler.ttft)

    def record(self, path, status, seconds):
        path = path if path in KNOWN_PATHS or path.startswith("/static/") else "other"
        path = "/static" if path.startswith("/static/") else path
        self.requests.labels(path=path, status=str(status)).inc()
        self.response_time.observe(seconds)

    def render(self):
        return generate_latest(self.registry)


class SchedulerCollector:
    """A prometheus_client collector of the scheduler's gauges and counters, read at each scrape."""

    def __init__(self, scheduler, *, started):
        self.scheduler, self.started = scheduler, started

    def collect(self):
        sched = self.scheduler
        s = sched.stats
        gauges = [("queue_depth", "Generations waiting for a slot.", sched.queued),
                  ("active_slots", "Slots generating now.", sched.active),
                  ("slots", "Slots in the decode batch.", sched.num_slots),
                  ("uptime_seconds", "Seconds since the server started.", round(time.time() - self.started, 3))]
        for name, help_, value in gauges:
            yield GaugeMetricFamily(f"picochat_{name}", help_, value=value)
        counters = [("generations", "Generations submitted.", s["requests"]),
                    ("prompt_tokens", "Prompt tokens prefilled.", s["prompt_tokens"]),
                    ("generated_tokens", "Tokens generated.", s["generated_tokens"]),
                    ("decode_steps", "Batched decode steps.", s["steps"]),
                    ("decode_step_seconds", "Time spent in decode steps.", round(s["step_seconds"], 6)),
                    ("scheduler_errors", "Decode steps that failed.", s["errors"])]
        for name, help_, value in counters:
            yield CounterMetricFamily(f"picochat_{name}", help_, value=value)
        finished = CounterMetricFamily("picochat_generations_finished", "Finished generations by reason.",
                                       labels=["reason"])
        for reason, count in sorted(dict(s["finished"]).items()):  # a copy: the scheduler thread may add one
            finished.add_metric([reason], count)
        yield finished
