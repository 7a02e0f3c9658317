"""picochat.metrics without an app: what /metrics exposes, read back with prometheus_client's own parser."""
from types import SimpleNamespace

from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from picochat.metrics import Metrics


def fake_scheduler(**stats):
    """What Metrics reads of an batching.Scheduler: its stats, its gauges and its two histograms."""
    base = {"requests": 0, "finished": {}, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0,
            "step_seconds": 0.0, "errors": 0}
    return SimpleNamespace(
        stats=dict(base, **stats), queued=2, active=3, num_slots=8,
        latency=Histogram("picochat_generation_seconds", "Submit to last token.", registry=None, buckets=(1, 10)),
        ttft=Histogram("picochat_time_to_first_token_seconds", "Submit to first token.", registry=None,
                       buckets=(0.1, 1)))


def families(metrics):
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def value(fams, family, sample, **labels):
    return [s.value for s in fams[family].samples if s.name == sample and s.labels == labels][0]


def test_every_metric_with_its_type_and_help():
    sched = fake_scheduler(requests=5, generated_tokens=42, prompt_tokens=17, steps=9, step_seconds=0.25,
                           errors=1, finished={"stop": 3, "length": 1})
    sched.latency.observe(2.0)
    sched.ttft.observe(0.05)
    m = Metrics(sched)
    m.record("/v1/chat/completions", 200, 0.02)
    fams = families(m)
    types = {name: f.type for name, f in fams.items()}
    assert types == {
        "picochat_http_requests": "counter", "picochat_http_response_seconds": "histogram",
        "picochat_queue_depth": "gauge", "picochat_active_slots": "gauge", "picochat_slots": "gauge",
        "picochat_uptime_seconds": "gauge", "picochat_generations": "counter", "picochat_prompt_tokens": "counter",
        "picochat_generated_tokens": "counter", "picochat_decode_steps": "counter",
        "picochat_decode_step_seconds": "counter", "picochat_scheduler_errors": "counter",
        "picochat_generations_finished": "counter", "picochat_generation_seconds": "histogram",
        "picochat_time_to_first_token_seconds": "histogram"}
    assert fams["picochat_http_requests"].documentation == "HTTP requests by path and status."
    assert fams["picochat_time_to_first_token_seconds"].documentation == "Submit to first token."
    assert value(fams, "picochat_queue_depth", "picochat_queue_depth") == 2
    assert value(fams, "picochat_active_slots", "picochat_active_slots") == 3
    assert value(fams, "picochat_slots", "picochat_slots") == 8
    assert value(fams, "picochat_generations", "picochat_generations_total") == 5
    assert value(fams, "picochat_generated_tokens", "picochat_generated_tokens_total") == 42
    assert value(fams, "picochat_prompt_tokens", "picochat_prompt_tokens_total") == 17
    assert value(fams, "picochat_decode_steps", "picochat_decode_steps_total") == 9
    assert value(fams, "picochat_decode_step_seconds", "picochat_decode_step_seconds_total") == 0.25
    assert value(fams, "picochat_scheduler_errors", "picochat_scheduler_errors_total") == 1
    assert value(fams, "picochat_generations_finished", "picochat_generations_finished_total", reason="stop") == 3
    assert value(fams, "picochat_generations_finished", "picochat_generations_finished_total", reason="length") == 1
    assert value(fams, "picochat_generation_seconds", "picochat_generation_seconds_bucket", le="1.0") == 0
    assert value(fams, "picochat_generation_seconds", "picochat_generation_seconds_bucket", le="10.0") == 1
    assert value(fams, "picochat_generation_seconds", "picochat_generation_seconds_count") == 1
    assert value(fams, "picochat_time_to_first_token_seconds", "picochat_time_to_first_token_seconds_sum") == 0.05
    assert value(fams, "picochat_http_response_seconds", "picochat_http_response_seconds_count") == 1
    # the names as the text carries them (dashboards query these), and no <name>_created series
    text = m.render().decode()
    assert 'picochat_http_requests_total{path="/v1/chat/completions",status="200"} 1.0' in text
    assert "# TYPE picochat_http_requests_total counter" in text
    assert "_created" not in text


def test_paths_are_bounded_and_the_scheduler_read_at_each_scrape():
    """A client cannot grow the series: unknown paths count as "other", every /static/* file as "/static"."""
    sched = fake_scheduler()
    m = Metrics(sched)
    for path, status in [("/v1/completions", 200), ("/v1/completions", 400), ("/v1/completions", 200),
                         ("/static/app.js", 200), ("/static/style.css", 304), ("/wp-admin", 404), ("/a/b/c", 404)]:
        m.record(path, status, 0.001)
    fams = families(m)
    counts = {(s.labels["path"], s.labels["status"]): s.value for s in fams["picochat_http_requests"].samples}
    assert counts == {("/v1/completions", "200"): 2, ("/v1/completions", "400"): 1, ("/static", "200"): 1,
                      ("/static", "304"): 1, ("other", "404"): 2}
    sched.stats["generated_tokens"] = 7
    sched.stats["finished"]["cancelled"] = 2
    sched.queued = 0
    fams = families(m)
    assert value(fams, "picochat_generated_tokens", "picochat_generated_tokens_total") == 7
    assert value(fams, "picochat_generations_finished", "picochat_generations_finished_total",
                 reason="cancelled") == 2
    assert value(fams, "picochat_queue_depth", "picochat_queue_depth") == 0


def test_apps_in_one_process_keep_their_own_counts():
    """Each Metrics has its own registry: a second app neither collides with the first nor sees its counts."""
    a, b = Metrics(fake_scheduler()), Metrics(fake_scheduler())
    a.record("/health", 200, 0.001)
    assert [s.value for s in families(a)["picochat_http_requests"].samples] == [1]
    assert families(b)["picochat_http_requests"].samples == []
