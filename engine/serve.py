"""`python -m engine.serve`: the OpenAI-compatible server on uvicorn.

Engine flags are made from the `EngineArgs` fields (`max_model_len` -> `--max-model-len`, vLLM's
names), so defaults live in one place; the server adds its own (--host, --port, --api-key, ...).
With no --model it serves the built-in demo model, so the bare command works on a fresh machine.
SIGINT / SIGTERM drain the server: it stops accepting, ends in-flight requests (503 / an error event)
and exits 0. If the engine dies under it (a tensor-parallel worker or the engine process fails, and no
step can run again), the server exits with status 1 so that whatever runs it starts a new one, as
vLLM's does; with ENGINE_KEEP_ALIVE_ON_ENGINE_DEATH=1 it stays up and answers 503 instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import re
import signal
import sys
import threading
import types
import typing
from typing import Iterator

import uvicorn
from starlette.applications import Starlette

from api.app import DEFAULT_MAX_BODY_BYTES, begin_shutdown, build_app
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineArgs
from engine.demo_model import DEMO_NAME, demo_model_path
from engine.llm_engine import freeze_gc_heap

logger = logging.getLogger("engine.serve")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _field_comments(cls: type) -> dict[str, str]:
    """The one-line comment after each dataclass field, which is its documentation."""
    pattern = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for m in map(pattern.match, inspect.getsource(cls).splitlines()) if m}


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field. Flags left out are not passed, so EngineArgs' defaults apply."""
    hints = typing.get_type_hints(EngineArgs)
    comments = _field_comments(EngineArgs)
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = "the demo model" if f.name == "model" else f.default
        help_text = comments.get(f.name, "") + ("" if default is None else f" (default: {default})")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            group.add_argument(flag, type=item, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif kind in (str, int, float):
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
        else:
            raise TypeError(f"EngineArgs.{f.name} has type {kind}, which engine.serve cannot make a flag of")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...).",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    server.add_argument("--port", type=_port, default=8000, help="port to listen on; 0 picks a free one (default: %(default)s)")
    add_app_flags(server)
    _add_engine_flags(parser)
    return parser


def add_app_flags(group: argparse._ArgumentGroup) -> None:
    """The flags of the OpenAI app around the engine (engine.ray_serve takes them too)."""
    group.add_argument("--served-model-name", default=None,
                       help="the model name clients use (default: the --model value, or the demo's name)")
    group.add_argument("--chat-template", default=None, metavar="FILE",
                       help="Jinja chat template file, used instead of the tokenizer's")
    group.add_argument("--api-key", default=os.environ.get("ENGINE_API_KEY"),
                       help="require `Authorization: Bearer KEY` (default: $ENGINE_API_KEY; unset = open)")
    group.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help="larger request bodies get 413 (default: %(default)s)")
    group.add_argument("--log-stats-interval", type=float, default=5.0, metavar="SECONDS",
                       help="seconds between throughput log lines while busy (default: %(default)s)")
    group.add_argument("--disable-log-stats", action="store_true",
                       help="no throughput log lines (vLLM's flag; --log-stats-interval sets how often otherwise)")
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="(default: %(default)s)")
    group.add_argument("--uvicorn-log-level", default=None,
                       choices=["critical", "error", "warning", "info", "debug", "trace"],
                       help="uvicorn's own log level (vLLM's flag; default: --log-level)")
    group.add_argument("--disable-log-requests", action="store_true",
                       help="accepted for vLLM's launch scripts: requests are not logged at info level anyway "
                            "(--log-level debug logs each one's timeline)")


def log_stats_interval(args: argparse.Namespace) -> float:
    """Seconds between throughput log lines (infinite: none, with --disable-log-stats)."""
    return math.inf if args.disable_log_stats else args.log_stats_interval


def app_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[EngineArgs, dict]:
    """The EngineArgs and `build_app`'s keyword arguments that the parsed flags ask for; bad values
    go to `parser.error`. With no --model, `EngineArgs.model` stays empty: the caller loads the demo."""
    engine_kwargs = {name: value for name, value in vars(args).items() if name in EngineArgs.field_names()}
    chat_template = None
    if args.chat_template is not None:
        try:
            with open(args.chat_template) as f:
                chat_template = f.read()
        except OSError as exc:
            parser.error(f"--chat-template: {exc}")
    try:
        engine_args = EngineArgs(**engine_kwargs)
    except ValueError as exc:
        parser.error(str(exc))
    app_kwargs = dict(served_model_name=args.served_model_name or engine_args.model or DEMO_NAME,
                      api_key=args.api_key, chat_template=chat_template, max_body_bytes=args.max_body_bytes)
    return engine_args, app_kwargs


KEEP_ALIVE_ON_ENGINE_DEATH = "ENGINE_KEEP_ALIVE_ON_ENGINE_DEATH"  # vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH


class _Server(uvicorn.Server):
    """uvicorn, draining on SIGINT/SIGTERM and exiting 0 after a clean drain; stopping by itself
    (`engine_died`) when the engine can serve no more."""

    def __init__(self, config: uvicorn.Config, app: Starlette, model_name: str):
        super().__init__(config)
        self.app = app
        self.model_name = model_name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.keep_alive_on_engine_death = os.environ.get(KEEP_ALIVE_ON_ENGINE_DEATH, "0").lower() not in ("", "0", "false")
        self.engine_died: str | None = None  # why, once the server stopped for it

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s; look at the engine every 0.5 s (its health check
        # also finds a worker or engine process that died while no request was running).
        server = self.app.state.server
        if (counter % 5 == 0 and self.engine_died is None and not self.keep_alive_on_engine_death
                and not self.should_exit and not server.draining):  # a drain stops workers too: not a death
            engine = server.engine
            if engine is not None and engine.is_running:
                with contextlib.suppress(Exception):
                    engine.check_health()
            if engine is not None and engine.dead_error is not None:
                self.engine_died = engine.dead_error
                logger.error("the engine died (%s): stopping the server, exit status 1 (%s=1 keeps it up, "
                             "answering 503)", engine.dead_error, KEEP_ALIVE_ON_ENGINE_DEATH)
                self.should_exit = True
        return await super().on_tick(counter)

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("serving %s at http://%s:%d/v1 (Ctrl+C to stop)", self.model_name, host, port)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit and self.loop is not None:
            logger.info("got %s: no new requests; ending those in flight", signal.Signals(sig).name)
            # A signal handler must not take locks the interrupted code may hold: hand over to the loop.
            self.loop.call_soon_threadsafe(begin_shutdown, self.app)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version re-raises the signal after shutting down, which makes the exit
        # status 128 + N; a server that drained cleanly exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0 to 65535)")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    engine_args, app_kwargs = app_settings(args, parser)
    if not engine_args.model:
        logger.info("no --model given: serving the built-in demo model (random weights; its words mean nothing)")
        engine_args.model = demo_model_path()
    try:
        engine = AsyncLLMEngine.from_engine_args(engine_args, log_stats_interval_s=log_stats_interval(args))
    except Exception as exc:  # a bad checkpoint or flag: one line, the traceback at debug level
        logger.error("cannot load %s: %s", engine_args.model, exc if isinstance(exc, (ValueError, OSError))
                     else f"{type(exc).__name__}: {exc}")
        logger.debug("the load failed here", exc_info=True)
        return 1
    if app_kwargs["chat_template"] is not None:
        try:  # a template that cannot render one user message is broken: say so now, not per request
            engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 chat_template=app_kwargs["chat_template"], add_generation_prompt=True)
        except Exception as exc:
            logger.error("--chat-template %s does not render a one-message conversation: %s", args.chat_template, exc)
            engine.shutdown()
            return 1
    freeze_gc_heap()  # this process keeps this engine (or its handle to the engine process) for its life
    app = build_app(engine, **app_kwargs)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level or args.log_level,
                            timeout_graceful_shutdown=10)
    server = _Server(config, app, app_kwargs["served_model_name"])
    server.run()
    return 1 if server.engine_died else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl+C while loading, before the server handles signals itself
        sys.exit(130)
