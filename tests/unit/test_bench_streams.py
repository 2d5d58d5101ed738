"""The streams benchmark's bookkeeping: one comparison per cache sizing of transformers serve.

The workloads are built from synthetic samples, so the ratios and verdicts are known exactly;
running the servers is the benchmark's job (`make bench`), not the test suite's.
"""

from __future__ import annotations

from bench.defaults import TSERVE_CACHES
from bench.report import Metric, Target
from bench.streams import StreamSample, StreamsResults, Workload
from bench.tserve_cache import TserveCache

_MIB = 1024 * 1024


def _workload(server: str, streams: int, seconds: float, ttft_s: float, rss_mib: int) -> Workload:
    """`streams` streams of 100 tokens, all sent at 0 and ended at `seconds`."""
    samples = [
        StreamSample(i, 0.0, ttft_s, seconds, 100, 40, "length", f"reply {i}")
        for i in range(streams)
    ]
    return Workload(server, streams, 100, samples, peak_rss_bytes=rss_mib * _MIB)


def _by_name(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


def test_flags_name_only_what_is_not_left_to_the_default() -> None:
    shipped = TserveCache("as shipped", None, None, Target("<", 0.5))
    sized = TserveCache("cache sized", 16, 256, Target("<", 1.0))
    assert shipped.flags() == []
    assert shipped.describe() == "as shipped (its defaults)"
    assert [shipped.option, sized.option] == ["as-shipped", "cache-sized"]
    assert sized.flags() == ["--cb-num-blocks", "16", "--cb-max-batch-tokens", "256"]
    assert "--cb-num-blocks 16" in sized.describe()


def test_each_cache_sizing_gets_its_own_ratios_and_memory_target() -> None:
    shipped, sized = TSERVE_CACHES
    results = StreamsResults(model="m", folder="f", tokens=100, compared=8)
    results.glm[1] = _workload("glm-api", 1, 4.0, 0.1, 1000)  # 25 tok/s
    results.glm[8] = _workload("glm-api", 8, 8.0, 0.5, 1000)  # 100 tok/s
    results.caches = {shipped.label: shipped, sized.label: sized}
    results.tserve[shipped.label] = _workload("ts", 8, 16.0, 1.0, 6000)  # 50 tok/s
    results.tserve[sized.label] = _workload("ts", 8, 10.0, 0.4, 1100)  # 80 tok/s

    metrics = _by_name(results.metrics())

    assert metrics["streams: glm-api aggregate tok/s, 8 streams / 1"].value == 4.0
    head = "streams x8: glm-api / transformers serve"
    tok = metrics[f"{head} (as shipped) aggregate tok/s"]
    assert tok.value == 2.0
    assert tok.verdict == "PASS"
    assert metrics[f"{head} (cache sized) aggregate tok/s"].value == 1.25
    assert metrics[f"{head} (as shipped) TTFT p50"].verdict == "PASS"
    ttft = metrics[f"{head} (cache sized) TTFT p50"]
    assert ttft.value == 1.25
    assert ttft.verdict == "FAIL"
    # 1000 / 6000 is under half; 1000 / 1100 is judged only by being under 1.
    rss_shipped = metrics[f"{head} (as shipped) peak RSS"]
    assert rss_shipped.target == Target("<", 0.5)
    assert rss_shipped.verdict == "PASS"
    rss_sized = metrics[f"{head} (cache sized) peak RSS"]
    assert rss_sized.target == Target("<", 1.0)
    assert rss_sized.verdict == "PASS"
    replies = metrics[f"{head} (as shipped): greedy replies identical"]
    assert replies.value == 8
    assert replies.unit == "of 8"

    as_json = results.as_dict()
    assert set(as_json["tserve"]) == {"as shipped", "cache sized"}
    assert as_json["identical_replies"]["cache sized"] == (8, 8)


def test_memory_over_half_of_the_shipped_server_fails() -> None:
    shipped = TSERVE_CACHES[0]
    results = StreamsResults(model="m", folder="f", tokens=100, compared=8)
    results.glm[8] = _workload("glm-api", 8, 8.0, 0.5, 4000)
    results.caches = {shipped.label: shipped}
    results.tserve[shipped.label] = _workload("ts", 8, 16.0, 1.0, 6000)
    rss = _by_name(results.metrics())[
        "streams x8: glm-api / transformers serve (as shipped) peak RSS"
    ]
    assert rss.verdict == "FAIL"
