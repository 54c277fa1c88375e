"""The engine on Ray Serve, on a real Ray cluster on this machine: replicas of a tiny model behind
Serve's HTTP proxy on loopback, driven by the official `openai` client and compared with the
single-process server; autoscaling; a killed replica replaced while the other answers."""

from __future__ import annotations

import socket
import threading
import time
import types
from typing import Callable

import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from api.app import build_app  # noqa: E402
from engine import EngineArgs  # noqa: E402
from engine.async_engine import AsyncLLMEngine  # noqa: E402
from engine.ray_serve import EngineServer, app_builder  # noqa: E402
from tests.test_server import GREEDY, ThreadedServer  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
ENGINE = dict(max_model_len=256, num_gpu_blocks_override=128)
PROMPTS = ["The quick brown fox", "Once upon a time", "Paris is the capital of", "One, two, three"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}; serve.status(): {serve.status()}")
        time.sleep(0.2)


def replica_states() -> dict[str, int]:
    return dict(serve.status().applications["default"].deployments[EngineServer.name].replica_states)


def replica_actor_names() -> list[str]:
    """Serve's replicas are named actors in its namespace: SERVE_REPLICA::<app>#<deployment>#<id>."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::default#{EngineServer.name}#"))


@pytest.fixture(scope="module")
def cluster():
    """One Ray cluster and Serve for the module: starting them takes seconds on 2 cores."""
    ray.init(num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(checkpoint: str, **args) -> None:
    """(Re)deploy the application as `serve run engine.ray_serve:app_builder ...` does; returns once
    its replicas are up."""
    serve.run(app_builder({"model": checkpoint, "served_model_name": MODEL, **ENGINE, **args}))


@pytest.fixture(scope="module")
def client(cluster, llama_checkpoint) -> openai.OpenAI:
    deploy(llama_checkpoint, num_replicas=2)
    return openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local_client(llama_checkpoint):
    """The same app on one process (what `python -m engine.serve` runs), for the expected answers."""
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=llama_checkpoint, **ENGINE))
    threaded = ThreadedServer(build_app(engine, served_model_name=MODEL))
    yield openai.OpenAI(base_url=threaded.url + "/v1", api_key="unused", max_retries=0)
    threaded.stop()


def answers(client: openai.OpenAI) -> list[tuple[str, str, str, int]]:
    """For each prompt: the completion, the same streamed, the chat reply streamed, and the number of chunks."""
    results = []
    for prompt in PROMPTS:
        full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY).choices[0].text
        chunks = [c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, stream=True, **GREEDY)]
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=8, stream=True, **GREEDY)
        results.append((full, "".join(chunks), "".join(c.choices[0].delta.content or "" for c in chat), len(chunks)))
    return results


# ---- bad settings fail before anything is deployed -----------------------------------------------


@pytest.mark.parametrize("args, message", [
    ({"model": "/no/such/checkpoint"}, "cannot load the model '/no/such/checkpoint'"),
    ({"min_replicas": 3, "max_replicas": 2}, r"--min-replicas \(3\) is more than --max-replicas \(2\)"),
    ({"num_replicas": 2, "max_replicas": 4}, "either --num-replicas"),
    ({"target_ongoing_requests": 4}, "for autoscaling"),
    ({"num_replicas": 0}, "num_replicas"),  # Ray's own check
    ({"autoscaling_config": "[1]"}, "not a JSON object"),
    ({"max_model_len": "many"}, "--max-model-len: invalid int value"),
    ({"enforce_eager": "maybe"}, "enforce_eager must be true or false"),
    ({"max_model_length": 256}, "unknown argument 'max_model_length'"),
    ({"tensor_parallel_size": 3}, "cannot be split over tensor_parallel_size=3"),
])
def test_bad_settings_raise_a_clear_value_error(llama_checkpoint, args, message):
    with pytest.raises(ValueError, match=message):
        app_builder({"model": llama_checkpoint, **args})


def test_builder_arguments_are_the_command_line_flags(llama_checkpoint):
    app = app_builder({"model": llama_checkpoint, "enforce_eager": "true", "cuda_graph_sizes": "1 2 4",
                       "min_replicas": "1", "max_replicas": 3, "autoscaling_config": {"downscale_delay_s": 60}})
    engine_args = app._bound_deployment.init_args[0]  # Serve has no public view of a built application
    assert (engine_args.enforce_eager, engine_args.cuda_graph_sizes, engine_args.device) == (True, [1, 2, 4], "cpu")
    config = app._bound_deployment._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.downscale_delay_s) == (1, 3, 60)


def test_a_gpu_deployment_builds_on_a_head_node_without_a_gpu(llama_checkpoint):
    # README: from a CPU-only head, --device cuda asks the cluster for GPU replicas.
    app = app_builder({"model": llama_checkpoint, "device": "cuda"})
    assert app._bound_deployment.ray_actor_options["num_gpus"] == 1
    assert app._bound_deployment.init_args[0].device == "cuda"


def test_health_check_fails_once_the_engine_loop_stops(llama_checkpoint):
    replica = types.SimpleNamespace(engine=AsyncLLMEngine.from_engine_args(EngineArgs(model=llama_checkpoint, **ENGINE)))
    check_health = EngineServer.func_or_class.check_health  # the method, without a replica around it
    check_health(replica)
    replica.engine.shutdown()
    with pytest.raises(RuntimeError, match="the engine's step loop is not running"):
        check_health(replica)


# ---- on the cluster ------------------------------------------------------------------------------


def test_replicas_answer_as_the_single_process_server_does(client, local_client):
    assert replica_states() == {"RUNNING": 2}
    got, expected = answers(client), answers(local_client)
    assert [a[:3] for a in got] == [a[:3] for a in expected]
    for full, streamed, chat, num_chunks in got:
        assert full == streamed and num_chunks > 1 and chat  # streamed through Serve in pieces


def test_a_killed_replica_is_replaced_while_the_other_answers(client):
    names = replica_actor_names()
    assert len(names) == 2
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    for prompt in PROMPTS:
        assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, **GREEDY).choices[0].text
    # The dead actor's name is gone at once; Serve notices on its next health check and starts another.
    wait_until(lambda: len(set(replica_actor_names()) - set(names)) == 1 and replica_states() == {"RUNNING": 2}, 60,
               "Serve replaced the killed replica")
    assert names[1] in replica_actor_names()
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, **GREEDY).choices[0].text


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(client, llama_checkpoint):
    deploy(llama_checkpoint, min_replicas=1, max_replicas=2, target_ongoing_requests=1, autoscaling_config={
        "upscale_delay_s": 0.5, "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1})
    wait_until(lambda: replica_states() == {"RUNNING": 1}, 60, "one replica runs")
    stop, failures = threading.Event(), []

    def load() -> None:
        while not stop.is_set():
            try:
                for _ in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=64,
                                                   stream=True, **GREEDY):
                    pass
            except Exception as exc:  # collected: a thread's exception would not fail the test
                failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: replica_states() == {"RUNNING": 2}, 60, "a second replica runs under load")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures
    wait_until(lambda: replica_states() == {"RUNNING": 1}, 60, "back to one replica after the load")
