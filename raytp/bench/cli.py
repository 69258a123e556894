"""`raytp bench [run|compare|checkpoint]` (also `python -m raytp.bench ...`).

    raytp bench --url http://127.0.0.1:8000 --concurrency 1,4,16,32      # any OpenAI-compatible server
    raytp bench --model bench-58m --concurrency 1,4,16,32                # starts raytp serve (TP=1, CPU)
    raytp bench compare --model bench-58m --concurrency 32               # transformers, in-process, HTTP
    raytp bench checkpoint                                               # write ~/.cache/raytp/bench-58m
"""
from __future__ import annotations

import argparse
import math
import sys

from raytp.bench.loadgen import parse_int_list, parse_range, parse_rate
from raytp.bench.runner import BenchOptions, bench_compare, bench_run

MODES = ("run", "compare", "checkpoint")
BENCH_HELP = "Benchmark an OpenAI-compatible server, and compare raytp with transformers and with its in-process engine."


def _arg(parse, what: str):
    def convert(text: str):
        try:
            return parse(text, what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = what  # argparse names the option's type in its error
    return convert


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "examples:\n" + __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("mode", nargs="?", choices=MODES, default="run",
                        help="run: load generator over HTTP (default); compare: transformers, raytp in-process and "
                             "raytp over HTTP side by side; checkpoint: write the bench-58m checkpoint")
    tgt = parser.add_argument_group("target")
    tgt.add_argument("--model", help="checkpoint dir, 'tiny' or 'bench-58m' (58M-parameter Llama, written on first "
                                     "use to ~/.cache/raytp/bench-58m); without --url, raytp serve is started for it")
    tgt.add_argument("--url", help="base URL of a running OpenAI-compatible server (e.g. http://127.0.0.1:8000)")
    tgt.add_argument("--served-model-name", help="`model` field of the requests (default: the server's first model)")
    tgt.add_argument("--vocab-size", type=int, help="vocabulary for random prompt ids (default: the checkpoint's)")
    tgt.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                     help="extra option for the raytp serve it starts, e.g. --server-arg=--max-num-seqs=64 (repeatable)")
    load = parser.add_argument_group("workload")
    load.add_argument("--num-prompts", type=int, default=32, help="requests per run (default: 32)")
    load.add_argument("--prompt-len", type=_arg(parse_range, "prompt-len"), default=(16, 128),
                      help="prompt tokens, N or MIN:MAX uniform (default: 16:128)")
    load.add_argument("--output-len", type=_arg(parse_range, "output-len"), default=(16, 96),
                      help="output tokens (ignore_eos), N or MIN:MAX uniform (default: 16:96)")
    load.add_argument("--request-rate", type=_arg(parse_rate, "request-rate"), default=math.inf,
                      help="inf: a burst at t=0 (default); R: Poisson arrivals of R requests/s")
    load.add_argument("--shared-prefix-len", type=int, default=0, metavar="N",
                      help="every prompt starts with the same N random tokens, then its own --prompt-len tokens "
                           "(a prefix-caching workload; default: 0)")
    load.add_argument("--join-prompt-len", type=int, default=0, metavar="N",
                      help="one more request with an N-token prompt arrives at --join-at seconds, while the others "
                           "stream; the report gives its TTFT and the longest gap it caused in the other streams")
    load.add_argument("--join-at", type=float, default=1.0, metavar="S", help="arrival of the joining prompt (default: 1.0)")
    load.add_argument("--concurrency", type=_arg(parse_int_list, "concurrency"), default=[1, 4, 16, 32],
                      help="most requests in flight; a comma list is a sweep (default: 1,4,16,32)")
    load.add_argument("--seed", type=int, default=0, help="workload seed (prompts, lengths, arrivals)")
    load.add_argument("--repeat", type=int, default=1,
                      help="runs per point, keeping the fastest (for a machine shared with other work; default: 1)")
    cmp_ = parser.add_argument_group("compare")
    cmp_.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b],
                      default=["transformers", "inprocess", "http"],
                      help="subset of transformers,inprocess,http (default: all)")
    cmp_.add_argument("--hf-batch-sizes", type=_arg(parse_int_list, "hf-batch-sizes"), default=[1, 4, 8, 16, 32],
                      help="transformers static batch sizes; 1 is one request at a time (default: 1,4,8,16,32)")
    cmp_.add_argument("--hf-threads", type=_arg(parse_int_list, "hf-threads"), default=None,
                      help="torch threads for transformers; a comma list tries each, and the best run is its "
                           "baseline (default: all cores)")
    cmp_.add_argument("--cpus-per-rank", type=int, default=1,
                      help="raytp's cpus_per_rank: torch threads of the in-process engine, and passed to the raytp "
                           "serve it starts (default: 1)")
    cmp_.add_argument("--tensor-parallel-size", type=int, default=1,
                      help="TP degree of the raytp serve started for the HTTP runs (default: 1; the in-process "
                           "engine is always TP=1, so the serving overhead is only reported at 1)")
    out = parser.add_argument_group("output")
    out.add_argument("--out-json", help="write the report as JSON here")
    out.add_argument("--out-png", help="write the latency-vs-throughput plot here (PNG)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        model=args.model, url=args.url, served_model_name=args.served_model_name, vocab_size=args.vocab_size,
        num_prompts=args.num_prompts, prompt_len=args.prompt_len, output_len=args.output_len,
        request_rate=args.request_rate, shared_prefix_len=args.shared_prefix_len,
        join_prompt_len=args.join_prompt_len, join_at=args.join_at, concurrency=args.concurrency, seed=args.seed, backends=args.backends,
        hf_batch_sizes=args.hf_batch_sizes, hf_threads=args.hf_threads, cpus_per_rank=args.cpus_per_rank,
        tensor_parallel_size=args.tensor_parallel_size,
        server_args=list(args.server_arg), out_json=args.out_json, out_png=args.out_png,
        progress=not args.no_progress, repeat=args.repeat,
    )


def run_bench(args: argparse.Namespace) -> int:
    if args.mode == "checkpoint":
        from raytp.bench.checkpoint import ensure_bench_checkpoint

        print(ensure_bench_checkpoint())
        return 0
    if min(args.num_prompts, args.repeat, args.cpus_per_rank, args.tensor_parallel_size) < 1:
        print("raytp bench: error: --num-prompts, --repeat, --cpus-per-rank and --tensor-parallel-size must be >= 1",
              file=sys.stderr)
        return 2
    if min(args.shared_prefix_len, args.join_prompt_len, args.join_at) < 0:
        print("raytp bench: error: --shared-prefix-len, --join-prompt-len and --join-at must be >= 0", file=sys.stderr)
        return 2
    opts = options_from_args(args)
    try:
        if args.mode == "compare":
            bench_compare(opts)
        else:
            bench_run(opts)
    except (ValueError, RuntimeError) as err:
        print(f"raytp bench: error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raytp bench", description=BENCH_HELP)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))
