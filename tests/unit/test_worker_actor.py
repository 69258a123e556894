"""TPWorkerActor's step thread, in-process (the class is plain Python; Ray only runs it): steps run by number,
whatever order the calls that bring them arrive in, and a step's error reaches the call that brought it."""
from __future__ import annotations

import threading
import time

import pytest

from raytp.sampling import SamplingParams
from raytp.engine.step import PREVIOUS_TOKEN, SeqStep
from raytp.cluster.worker import TPWorker
from raytp.cluster.worker_actor import TPWorkerActor
from tests.helpers import write_llama

pytestmark = pytest.mark.timeout(120)

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("worker-actor"))


def _ready(worker: TPWorker, path: str) -> TPWorker:
    worker.init_communicator(None)
    worker.load(path)
    worker.init_kv_cache(8, BLOCK_SIZE)
    return worker


def _steps() -> list[list[SeqStep]]:
    """A prompt step, then two decode steps that feed back the token sampled in the step before."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = {"a": [5, 9, 23, 7], "b": [40, 3, 11]}
    first = [SeqStep(ids, 0, [i], greedy, 0, rid) for i, (rid, ids) in enumerate(prompts.items())]
    return [first] + [[SeqStep([PREVIOUS_TOKEN], len(ids) + k, [i], greedy, k + 1, rid)
                       for i, (rid, ids) in enumerate(prompts.items())] for k in range(2)]


def test_steps_run_by_number_whatever_order_they_arrive_in(checkpoint):
    plain = _ready(TPWorker(0, 1, "cpu", "float32", num_threads=1), checkpoint)
    expected = [plain.execute(seqs).token_ids for seqs in _steps()]

    actor = _ready(TPWorkerActor(0, 1, "cpu", "float32", num_threads=1), checkpoint)
    results: dict[int, list[int]] = {}

    def call(number: int, seqs: list[SeqStep]) -> None:
        results[number] = actor.run_step(0, number, seqs).token_ids

    # The last step's call arrives first and the first step's last: each waits for the steps before it.
    threads = [threading.Thread(target=call, args=(n, seqs)) for n, seqs in reversed(list(enumerate(_steps())))]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=60)
    assert [results[n] for n in range(3)] == expected


def test_a_failing_step_raises_in_its_call_and_the_next_step_runs(checkpoint):
    actor = _ready(TPWorkerActor(0, 1, "cpu", "float32", num_threads=1), checkpoint)
    first, *_ = _steps()
    orphan = [SeqStep([PREVIOUS_TOKEN], 4, [0], SamplingParams(max_tokens=2, temperature=0.0), 1, "never-seen")]
    with pytest.raises(KeyError, match="never-seen"):
        actor.run_step(0, 0, orphan)  # no previous step sampled a token for this request
    assert len(actor.run_step(0, 1, first).token_ids) == 2


def test_warm_up_runs_every_onednn_gemm_size_of_each_weight_shape(checkpoint, monkeypatch):
    """Where linears run on oneDNN (no AVX-512 for raytp's own op), whose kernels are built per row count, the
    warm-up runs every row bucket of every weight shape."""
    from raytp.model import cpu_ops
    from raytp.model.layers import PackableLinear, ParallelLMHead, padded_rows, row_buckets

    monkeypatch.setattr(cpu_ops, "linear_op", lambda dtype="float32": None)  # as on a CPU without AVX-512
    worker = _ready(TPWorker(0, 1, "cpu", "float32", num_threads=1), checkpoint)
    assert {m.kernel for m in worker.model.modules() if isinstance(m, PackableLinear)} == {"onednn"}
    ran = set()  # (layer kind, weight shape, rows the GEMM ran at)
    matmul = PackableLinear.matmul

    def recording_matmul(self, x, bias=None):
        ran.add((type(self), tuple(self.weight.shape), padded_rows(x.shape[0])))
        return matmul(self, x, bias)

    monkeypatch.setattr(PackableLinear, "matmul", recording_matmul)
    worker.warm_up(48, kernels_up_to_seqs=4)
    assert row_buckets(48) == list(range(1, 33)) + [64]
    for m in worker.model.modules():
        if isinstance(m, PackableLinear):
            wanted = row_buckets(4 if isinstance(m, ParallelLMHead) else 48)
            assert {(type(m), tuple(m.weight.shape), rows) for rows in wanted} <= ran
