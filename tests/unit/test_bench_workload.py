"""The load generator's workloads (shared prefix, a long prompt joining running streams) and what the report
says of them; no server."""
import math

from raytp.bench import report
from raytp.bench.loadgen import RequestResult, RunResult, arrival_times, make_workload


def test_shared_prefix_workload():
    specs = make_workload(6, (16, 48), (16, 16), vocab_size=32000, seed=1, shared_prefix_len=768)
    prefix = specs[0].prompt_ids[:768]
    assert all(s.prompt_ids[:768] == prefix and 768 + 16 <= len(s.prompt_ids) <= 768 + 48 for s in specs)
    assert len({tuple(s.prompt_ids[768:]) for s in specs}) == 6  # each has its own tail
    assert make_workload(6, (16, 48), (16, 16), 32000, seed=1, shared_prefix_len=768) == specs  # same seed, same


def test_long_prompt_joins_at_its_time():
    specs = make_workload(12, (16, 64), (160, 160), vocab_size=32000, seed=0, join_prompt_len=1800)
    arrivals = arrival_times(12, math.inf, join_at=1.0)
    assert len(specs) == len(arrivals) == 13
    assert [s.joins for s in specs] == [False] * 12 + [True]
    assert len(specs[-1].prompt_ids) == 1800 and specs[-1].output_len == 160
    assert arrivals == [0.0] * 12 + [1.0]
    poisson = arrival_times(5, 2.0, seed=3, join_at=0.5)
    assert poisson[:5] == arrival_times(5, 2.0, seed=3) and poisson[5] == 0.5


def test_report_gives_the_gap_the_joining_prompt_caused():
    streams = [RequestResult(i, 20, 4, output_tokens=4, ttft=0.01, itl=[0.02, 0.5 + i, 0.02], e2e=1.0 + i)
               for i in range(2)]
    joined = RequestResult(2, 1800, 4, joins=True, output_tokens=4, ttft=0.6, itl=[9.0, 0.02, 0.02], e2e=10.0)
    s = report.summarize(RunResult("x", 3, math.inf, 10.0, streams + [joined]))
    assert s["join"] == {"prompt_len": 1800, "ttft_ms": 600.0, "streams_max_itl_ms": 1500.0}
    assert s["itl_ms"]["max"] == 9000.0  # all requests' gaps, the joining one's own included
    assert "join" not in report.summarize(RunResult("x", 2, math.inf, 3.0, streams))
