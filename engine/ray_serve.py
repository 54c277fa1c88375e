"""The engine on a Ray cluster: replicas of the OpenAI server behind Ray Serve's HTTP proxies.

Each Serve replica is one `AsyncLLMEngine` (its own weights, KV cache and step loop) with the same
Starlette app that `python -m engine.serve` runs as its ASGI ingress, so every endpoint, streaming
(SSE) included, behaves as on one machine. Serve routes each HTTP request to a replica, adds and
removes replicas (a fixed --num-replicas, or autoscaling between --min-replicas and --max-replicas
on the requests in flight per replica), and replaces a replica whose health check fails or whose
process dies, while the others keep answering.

Tensor parallelism stays inside a replica: its ranks are the replica's child processes
(`engine.tensor_parallel`), which see the GPUs Ray gives the replica. So on GPU a replica asks for
`tensor_parallel_size` GPUs in one placement-group bundle (STRICT_PACK: one node), and its actor
takes them all; on CPU it asks for --num-cpus-per-replica CPUs.

Two ways in, with the same settings (the engine's flags, the app's, and Serve's below):

    serve run engine.ray_serve:app_builder model=/models/qwen3 tensor_parallel_size=2 max_replicas=4
    python -m engine.ray_serve --model /models/qwen3 --tensor-parallel-size 2 --max-replicas 4

Only this module imports Ray (`pip install 'engine[ray]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from typing import Any, NoReturn

import ray
from ray import serve
from starlette.applications import Starlette
from transformers import AutoConfig

from api.app import build_app
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineArgs, check_tensor_parallel_sizes
from engine.demo_model import demo_model_path
from engine.serve import LOG_FORMAT, _add_engine_flags, add_app_flags, app_settings, log_stats_interval

logger = logging.getLogger("engine.ray_serve")

APP_NAME = "default"  # `serve run`'s, so both ways in deploy the same application


@serve.deployment
@serve.ingress()
class EngineServer:
    """One replica: an engine and the OpenAI app around it. Serve's options (replicas, resources)
    are set per application by `build_application`."""

    async def __init__(self, engine_args: EngineArgs, app_kwargs: dict[str, Any], log_stats_interval_s: float,
                       log_level: str):
        # Serve sets up its own loggers only; the engine's log lines go to the replica's stderr, which
        # Ray shows on the driver and keeps in the worker's log file.
        logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
        if not engine_args.model:  # the demo model, built on each node that runs a replica
            engine_args = dataclasses.replace(engine_args, model=demo_model_path())
        # Loading takes a while; off the replica's event loop, so Serve can still talk to the replica.
        self.engine = await asyncio.to_thread(AsyncLLMEngine.from_engine_args, engine_args, log_stats_interval_s)
        self.app_kwargs = app_kwargs

    def __serve_build_asgi_app__(self) -> Starlette:
        """Serve calls this after `__init__`; the app owns the engine from here and shuts it down
        when Serve stops the replica (after its requests drained)."""
        return build_app(self.engine, **self.app_kwargs)

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising marks the replica unhealthy and Serve
        replaces it."""
        self.engine.check_health()  # EngineNotRunningError: the loop stopped, or a worker died while idle


# ---- settings -----------------------------------------------------------------------------------


class _BuilderArgumentParser(argparse.ArgumentParser):
    """For `app_builder`, whose arguments are not a command line: a bad one raises ValueError (which
    `serve run` prints) instead of exiting the process."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(
        prog="python -m engine.ray_serve",
        description="Serve a model on a Ray cluster: replicas of the OpenAI-compatible server behind Ray Serve.",
        allow_abbrev=False,
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address Serve's HTTP proxies listen on, one per node; 0.0.0.0 for other machines "
                             "(default: %(default)s)")
    server.add_argument("--port", type=int, default=8000, help="port of Serve's HTTP proxies (default: %(default)s)")
    add_app_flags(server)
    cluster = parser.add_argument_group("ray serve")
    cluster.add_argument("--address", default=None,
                         help="Ray cluster to join (default: $RAY_ADDRESS, else the one `ray start` runs on this "
                              "machine, else a new one on this machine)")
    cluster.add_argument("--num-replicas", type=int, default=None,
                         help="a fixed number of replicas (default: 1, unless --min/--max-replicas autoscale)")
    cluster.add_argument("--min-replicas", type=int, default=None,
                         help="autoscale: fewest replicas (default: 1 when --max-replicas is given)")
    cluster.add_argument("--max-replicas", type=int, default=None,
                         help="autoscale: most replicas (default: --min-replicas)")
    cluster.add_argument("--target-ongoing-requests", type=float, default=None,
                         help="autoscale: requests in flight per replica to aim for (default: half of "
                              "--max-ongoing-requests)")
    cluster.add_argument("--autoscaling-config", type=_json_object, default=None, metavar="JSON",
                         help="autoscale: more of Serve's autoscaling_config, e.g. "
                              "'{\"upscale_delay_s\": 10, \"downscale_delay_s\": 120}' (Serve's defaults: 30 and "
                              "600 seconds); the flags above win over the same fields here")
    cluster.add_argument("--max-ongoing-requests", type=int, default=None,
                         help="most requests one replica takes at a time; more wait in Serve's queue for any "
                              "replica (default: --max-num-seqs, the most the engine batches)")
    cluster.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                         help="CPUs each replica reserves (default: %(default)s)")
    _add_engine_flags(parser)
    return parser


def deployment_options(args: argparse.Namespace, engine_args: EngineArgs) -> dict[str, Any]:
    """Serve's options for the engine deployment: how many replicas, and what each one reserves."""
    autoscale = args.min_replicas is not None or args.max_replicas is not None or args.autoscaling_config is not None
    if autoscale and args.num_replicas is not None:
        raise ValueError("give either --num-replicas (a fixed count) or --min-replicas/--max-replicas "
                         "(autoscaling), not both")
    max_ongoing = args.max_ongoing_requests or engine_args.max_num_seqs
    options: dict[str, Any] = {"max_ongoing_requests": max_ongoing}
    if autoscale:
        config = dict(args.autoscaling_config or {})
        for name in ("min_replicas", "max_replicas", "target_ongoing_requests"):
            if getattr(args, name) is not None:
                config[name] = getattr(args, name)
        config.setdefault("min_replicas", 1)
        config.setdefault("max_replicas", config["min_replicas"])
        config.setdefault("target_ongoing_requests", max(1, max_ongoing // 2))
        if config["min_replicas"] > config["max_replicas"]:
            raise ValueError(f"--min-replicas ({config['min_replicas']}) is more than "
                             f"--max-replicas ({config['max_replicas']})")
        options["autoscaling_config"] = config
    else:
        if args.target_ongoing_requests is not None:
            raise ValueError("--target-ongoing-requests is for autoscaling: give --min-replicas/--max-replicas")
        options["num_replicas"] = 1 if args.num_replicas is None else args.num_replicas
    cpus = args.num_cpus_per_replica
    # `auto` means what it means for the engine, judged on this machine: on a cluster whose head has
    # no GPU but whose workers do, pass --device cuda.
    if engine_args.resolve_device().type == "cuda":
        gpus = engine_args.tensor_parallel_size
        options["ray_actor_options"] = {"num_cpus": cpus, "num_gpus": gpus}
        options["placement_group_bundles"] = [{"CPU": cpus, "GPU": gpus}]
        options["placement_group_strategy"] = "STRICT_PACK"
    else:
        options["ray_actor_options"] = {"num_cpus": cpus}
    return options


def _check_model(engine_args: EngineArgs) -> None:
    """Fail here, not in every replica (which Serve would retry): the checkpoint's config must load
    and split `tensor_parallel_size` ways. The path must exist here as on every node."""
    try:
        hf_config = AutoConfig.from_pretrained(engine_args.model, trust_remote_code=engine_args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the model {engine_args.model!r}: {exc}") from exc
    check_tensor_parallel_sizes(hf_config, engine_args.tensor_parallel_size)


def build_application(args: argparse.Namespace, parser: argparse.ArgumentParser) -> serve.Application:
    """The Serve application the parsed flags describe. Bad settings raise ValueError (or, from
    `app_settings`, go to `parser.error`)."""
    engine_args, app_kwargs = app_settings(args, parser)
    if engine_args.model:
        _check_model(engine_args)
    resolved = dataclasses.replace(engine_args, device=engine_args.resolve_device().type)  # as judged here
    deployment = EngineServer.options(**deployment_options(args, engine_args))
    return deployment.bind(resolved, app_kwargs, log_stats_interval(args), args.log_level)


def _builder_argv(parser: argparse.ArgumentParser, args: dict[str, Any]) -> list[str]:
    """`serve run` arguments (`key=value`, or a config file's `args:`) as this module's flags: keys
    are the flags' names with underscores (`tensor_parallel_size=2`, `enforce_eager=true`)."""
    argv = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None or action.dest != key:
            raise ValueError(f"unknown argument {key!r}; the arguments are the flags of "
                             f"`python -m engine.ray_serve --help`, with underscores")
        if isinstance(action, argparse.BooleanOptionalAction):
            text = str(value).lower()
            if text not in ("true", "false"):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            argv.append(flag if text == "true" else "--no-" + flag[2:])
        elif action.nargs == "+":
            items = value if isinstance(value, list) else str(value).replace(",", " ").split()
            argv += [flag, *map(str, items)]
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's application builder: `serve run engine.ray_serve:app_builder model=... ...`."""
    parser = build_parser(_BuilderArgumentParser)
    return build_application(parser.parse_args(_builder_argv(parser, args)), parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        app = build_application(args, parser)
    except ValueError as exc:
        parser.error(str(exc))
    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=APP_NAME)  # returns once every replica is up; raises if they cannot start
    logger.info("serving at http://%s:%d/v1 (Ctrl+C to stop)", args.host, args.port)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop on SIGTERM as on Ctrl+C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("deleting the application (its replicas finish the requests they hold)")
        serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl+C while connecting or deploying
        sys.exit(130)
