"""The `raytp` command line.

    raytp serve --model tiny --tensor-parallel-size 2 --device cpu --port 8000 --metrics-export-port 8080

Subcommands are entries of COMMANDS: a name, a one-line help, a function that
adds its arguments to its subparser and a function that runs it (returning
the exit status). A new subcommand (`raytp bench`, ...) adds one entry.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from raytp.bench.cli import BENCH_HELP, add_bench_arguments, run_bench
from raytp.config import ConfigError, EngineConfig
from raytp.engine.model_check import check_model
from raytp.ingress import choose_ingress


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _say(msg: str) -> None:
    print(f"raytp: {msg}", flush=True)


# ---- EngineConfig fields as options ------------------------------------------------------


def add_engine_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` option per EngineConfig field, typed and described by the field itself.

    Options left out are not passed on, so EngineConfig's defaults (and its
    validation, which names the field and the value) apply.
    """
    group = parser.add_argument_group("engine (raytp.config.EngineConfig)")
    for name, field in EngineConfig.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        ann = field.annotation
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = args[0] if len(args) == 1 else str
        default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)})"
        kwargs["help"] = (field.description or "") + default
        if ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is list:  # e.g. --cors-allow-origins A B
            kwargs.update(nargs="+", type=typing.get_args(ann)[0])
        elif typing.get_origin(ann) is typing.Literal:
            choices = typing.get_args(ann)
            kwargs.update(choices=choices, type=type(choices[0]), metavar="{" + "|".join(map(str, choices)) + "}")
        else:
            kwargs["type"] = ann if ann in (int, float, str) else str
        if field.is_required():
            kwargs["required"] = True
        group.add_argument(flag, **kwargs)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = {name: getattr(args, name) for name in EngineConfig.model_fields if hasattr(args, name)}
    return EngineConfig.parse(values)


# ---- raytp serve -------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_config_arguments(parser)
    srv = parser.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP host of Serve's proxy (0.0.0.0 to expose it).")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port of Serve's proxy.")
    srv.add_argument("--metrics-export-port", type=int, default=None,
                     help="Port of Ray's Prometheus metrics on this node (when raytp starts Ray).")
    srv.add_argument("--num-replicas", type=int, default=1, help="Serve replicas (each one TP group).")
    srv.add_argument("--app-name", default="raytp", help="Serve application name.")
    srv.add_argument("--route-prefix", default="/", help="Serve route prefix of the application.")
    srv.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                     help="How HTTP reaches the replicas of the local Ray this command starts: 'haproxy' (Serve's "
                          "HAProxy ingress: HAProxy, bundled with ray[serve] on Linux, hands each connection to the "
                          "replica's own HTTP server) or 'proxy' (Serve's Python proxy actor: one more process and one "
                          "Ray call per streamed chunk). A cluster joined through RAY_ADDRESS keeps its own setting. "
                          "(default: haproxy)")
    ray_opts = parser.add_argument_group("ray (when raytp starts Ray; with RAY_ADDRESS set it joins that cluster)")
    ray_opts.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all).")
    ray_opts.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local Ray (default: all).")
    ray_opts.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=False,
                          help="Start Ray's dashboard (default: no).")


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def _serve_http(host: str, port: int) -> tuple[str, int]:
    """The proxy's actual (host, port): an already running Serve keeps its own HTTP options."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        return http.host, http.port
    except Exception:  # internal API moved: assume ours
        return host, port


def _node_metrics_port() -> int | None:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return node.get("MetricsExportPort")
    return None


def _wait_for_signal() -> int:
    """Block until SIGINT or SIGTERM; returns the signal number."""
    got: list[int] = []

    def handler(signum, frame):
        # Only a list append: the handler runs between two bytecodes of the main thread, which may hold any lock
        # at that moment (an Event's, while it waits), so taking one here can deadlock the process for good.
        got.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not got:
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return got[0]


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = engine_config_from_args(args)
    except ConfigError as err:
        print(f"raytp serve: error: {err}", file=sys.stderr)
        return 2

    joining = bool(os.environ.get("RAY_ADDRESS"))
    try:
        check_model(config, remote_ok=joining)
    except ValueError as err:  # CheckpointError, ModelShapeError: before any process starts, not a retried replica
        print(f"raytp serve: error: {err}", file=sys.stderr)
        return 2
    ray_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if not joining and not ray_running and "ray.serve" not in sys.modules:
        choose_ingress(args.ingress, say=_say)

    import ray
    from ray import serve

    from raytp.cluster.cpu_binding import keep_off_rank_cores
    from raytp.serve.app import build_deployment

    started_ray = False
    if joining:
        _say(f"joining the Ray cluster at {os.environ['RAY_ADDRESS']}")
        ray.init(log_to_driver=True)
        if args.metrics_export_port is not None:
            _say("--metrics-export-port is ignored when joining a cluster: its nodes export metrics on their own ports")
    elif ray.is_initialized():
        pass
    else:
        _say("starting a local Ray")
        if config.resolved_device() == "cpu" and config.binds_cores():
            # Ray's processes inherit this: the proxy, the replica and the daemons stay off the ranks' cores.
            rest = keep_off_rank_cores(config.tensor_parallel_size * config.rank_threads())
            if rest:
                _say(f"Ray's processes run on cores {rest}; the ranks get cores of their own")
        ray.init(num_cpus=args.num_cpus, num_gpus=args.num_gpus, include_dashboard=args.dashboard,
                 _metrics_export_port=args.metrics_export_port, log_to_driver=True)
        started_ray = True

    started_serve = not _serve_running()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        host, port = _serve_http(args.host, args.port)
        if (host, port) != (args.host, args.port):
            _say(f"Serve was already running on this cluster with HTTP at {host}:{port}; using that")
        _say(f"deploying {config.model_name()} (tensor_parallel_size={config.tensor_parallel_size}, "
             f"device={config.device}, replicas={args.num_replicas})")
        serve.run(build_deployment(config, num_replicas=args.num_replicas), name=args.app_name,
                  route_prefix=args.route_prefix, blocking=False)
    except KeyboardInterrupt:
        _say("interrupted while deploying; shutting down")
        _shutdown(args.app_name, started_serve, started_ray)
        return 130
    except Exception as err:
        print(f"raytp serve: error: deploying failed: {type(err).__name__}: {err}", file=sys.stderr)
        _shutdown(args.app_name, started_serve, started_ray)
        return 1

    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefix = args.route_prefix.rstrip("/")
    _say(f"OpenAI API at http://{shown}:{port}{prefix}/v1 (model {config.model_name()!r})")
    metrics = _node_metrics_port()
    if metrics:
        _say(f"metrics at http://127.0.0.1:{metrics}/metrics")
    _say("press Ctrl-C to stop")
    signum = _wait_for_signal()
    _say(f"got {signal.Signals(signum).name}; shutting down")
    _shutdown(args.app_name, started_serve, started_ray)
    _say("stopped")
    return 0


def _shutdown(app_name: str, started_serve: bool, started_ray: bool) -> None:
    """Undo what this command started: Serve (or only our app, if Serve was already there) and Ray."""
    import ray
    from ray import serve

    try:
        if started_serve:
            serve.shutdown()
        else:
            serve.delete(app_name)
    except Exception as err:
        print(f"raytp serve: warning: shutting Serve down failed: {err}", file=sys.stderr)
    if started_ray:
        ray.shutdown()


# ---- the command registry ----------------------------------------------------------------

COMMANDS: list[Command] = [
    Command("serve", "Serve a model with an OpenAI-compatible API on Ray Serve.", add_serve_arguments, run_serve),
    Command("bench", BENCH_HELP, add_bench_arguments, run_bench),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytp", description="Elastic tensor-parallel LLM serving on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
