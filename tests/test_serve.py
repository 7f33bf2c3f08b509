"""`prodesc serve`: the real server on a tiny trained run (openai client, batching, input safety, auth), and the
overload / timeout / disconnect paths in-process with a fake generator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from prodesc.cli import app as cli_app
from prodesc.config import ProdescConfig, ServeConfig
from prodesc.serve import create_app

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
RUN_NAME = "tiny-run"


# ---- a tiny trained run and a real server (shared with test_serve_browser.py) ----------------------------------


def make_tiny_run(root: Path) -> Path:
    """Train the `tiny` preset for 5 steps on 200 synthetic rows (~10 s); reused when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prodesc import config
    from prodesc.train import recipe as train

    run = root / RUN_NAME
    if (run / "adapter").exists():
        return run
    rng, data = random.Random(0), root / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(200):
        color, thing = rng.choice(["red", "blue", "green", "black"]), rng.choice(["mug", "lamp", "chair", "tutu"])
        rows.append({"uid": f"{i:05d}", "title": f"{color.title()} {thing.title()} {i}",
                     "content": f"A {color} {thing} for every day. Item {i}.", "family": f"{thing}-{i % 25}"})
    for split, part in (("train", rows[:160]), ("val", rows[160:180]), ("test", rows[180:])):
        pq.write_table(pa.Table.from_pylist(part), data / f"{split}.parquet")
    cfg = config.load(ROOT / "configs/tiny.yaml", ["train.max_steps=5", "train.eval_steps=5", "train.save_steps=5"])
    with one_torch_thread():
        return train.train(cfg, data, run)


@contextlib.contextmanager
def one_torch_thread():
    """A tiny model gains nothing from 2 threads, and on 2 busy cores OpenMP's spinning threads make it 10-100x
    slower (measured: 64x64 matmuls 7 s vs 0.05 s at load 8)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def auth(self, key: str = KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def post(self, path: str, body: object, key: str = KEY, **kw: object) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.auth(key), timeout=60, **kw)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` (with these labels) in /metrics."""
        text = httpx.get(self.url + "/metrics", headers=self.auth()).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, *extra: str, key: str = KEY) -> Server:
    """`prodesc serve --run RUN` in a subprocess on a free port; returns once /healthz answers."""
    port, log = free_port(), run.parent / f"serve-{time.time_ns()}.log"
    cmd = [sys.executable, "-m", "prodesc.cli", "serve", "--run", str(run), "--port", str(port), "--api-key", key,
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread
    env.pop("PRODESC_API_KEY", None)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server, deadline = Server(f"http://127.0.0.1:{port}", proc, log), time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prodesc serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return server
        time.sleep(0.2)
    stop_server(server)
    pytest.fail(f"prodesc serve did not answer /healthz in 90 s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_run(tmp_path_factory.getbasetemp() / "serve")


@pytest.fixture(scope="module")
def server(tiny_run: Path):
    s = start_server(tiny_run, "--set", "serve.batch_window_ms=50")
    yield s
    stop_server(s)


@pytest.fixture
def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


# ---- the real server ---------------------------------------------------------------------------------------------


def test_healthz_is_open_and_lists_the_models(server: Server) -> None:
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200
    assert r.json()["models"] == [RUN_NAME, f"{RUN_NAME}-base"]


def test_openai_client_lists_finetuned_and_base_models(client) -> None:
    assert [m.id for m in client.models.list()] == [RUN_NAME, f"{RUN_NAME}-base"]


def test_openai_client_gets_a_plain_chat_completion(client) -> None:
    r = client.chat.completions.create(model=RUN_NAME, messages=[{"role": "user", "content": "Red Mug 7"}],
                                       max_tokens=24)
    assert r.model == RUN_NAME
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 0


def test_openai_client_streams_the_same_greedy_answer(client) -> None:
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Blue Lamp 12"}]
    plain = client.chat.completions.create(model=RUN_NAME, messages=messages, max_tokens=24)
    chunks = list(client.chat.completions.create(model=RUN_NAME, messages=messages, max_tokens=24, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_base_model_is_the_run_without_its_adapter(server: Server) -> None:
    body = {"titles": ["Green Chair 3"], "max_new_tokens": 16}
    tuned = server.post("/v1/describe", body).json()
    base = server.post("/v1/describe", {**body, "model": f"{RUN_NAME}-base"}).json()
    assert (tuned["model"], base["model"]) == (RUN_NAME, f"{RUN_NAME}-base")
    assert tuned["descriptions"][0]["description"] != base["descriptions"][0]["description"]


def test_describe_keeps_order_and_echoes_titles(server: Server) -> None:
    titles = ["Red Mug 1", "A much longer title: Black Tutu 99 for dancers", "Blue Lamp 2"]
    r = server.post("/v1/describe", {"titles": titles, "max_new_tokens": 12})
    assert r.status_code == 200
    out = r.json()["descriptions"]
    assert [d["title"] for d in out] == titles
    assert all(set(d) == {"title", "description", "n_tokens", "stopped_by_eos"} for d in out)
    assert all(1 <= d["n_tokens"] <= 12 for d in out)


def test_fifty_concurrent_requests_share_generation_calls(server: Server) -> None:
    calls_before = server.metric("prodesc_generation_calls_total")
    with httpx.Client(headers=server.auth(), timeout=60) as http, ThreadPoolExecutor(50) as pool:
        def one(i: int) -> httpx.Response:
            return http.post(server.url + "/v1/describe", json={"titles": [f"Red Mug {i}"], "max_new_tokens": 8})

        responses = list(pool.map(one, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert [r.json()["descriptions"][0]["title"] for r in responses] == [f"Red Mug {i}" for i in range(50)]
    calls = server.metric("prodesc_generation_calls_total") - calls_before
    assert 1 <= calls < 50, f"{calls} generation calls for 50 requests"


def test_metrics_expose_requests_latency_tokens_and_batch_sizes(server: Server) -> None:
    server.post("/v1/describe", {"titles": ["Red Mug 5", "Blue Mug 6"], "max_new_tokens": 8})
    assert server.metric("prodesc_requests_total", endpoint="/v1/describe", status="200") >= 1
    assert server.metric("prodesc_request_latency_seconds_count", endpoint="/v1/describe") >= 1
    assert server.metric("prodesc_generated_tokens_total") > 0
    assert server.metric("prodesc_tokens_per_second") > 0
    assert server.metric("prodesc_batch_size_count") >= 1
    assert server.metric("prodesc_batch_size_bucket", le="1.0") < server.metric("prodesc_batch_size_bucket", le="+Inf")


BAD_DESCRIBE = {
    "empty title": ({"titles": [""]}, "titles[0] is empty"),
    "blank title": ({"titles": ["   "]}, "titles[0] is empty"),
    "title too long": ({"titles": ["x" * 1001]}, "at most 1000"),
    "no titles": ({"titles": []}, "titles is empty"),
    "too many titles": ({"titles": ["Mug"] * 65}, "at most 64"),
    "max_new_tokens over cap": ({"titles": ["Mug"], "max_new_tokens": 100_000}, "max_new_tokens_cap"),
    "max_new_tokens zero": ({"titles": ["Mug"], "max_new_tokens": 0}, "between 1 and"),
    "temperature too high": ({"titles": ["Mug"], "temperature": 2.5}, "temperature"),
    "temperature negative": ({"titles": ["Mug"], "temperature": -0.1}, "temperature"),
    "top_p zero": ({"titles": ["Mug"], "top_p": 0}, "top_p"),
    "titles not a list": ({"titles": "Mug"}, "titles: Input should be a valid list"),
    "title not a string": ({"titles": [3]}, "titles.0: Input should be a valid string"),
    "max_new_tokens a string": ({"titles": ["Mug"], "max_new_tokens": "10"}, "valid integer"),
    "temperature a bool": ({"titles": ["Mug"], "temperature": True}, "valid number"),
    "unknown field": ({"titles": ["Mug"], "max_tokens": 5}, "max_tokens: Extra inputs are not permitted"),
    "missing titles": ({}, "titles: Field required"),
    "not an object": ([1, 2], "JSON list"),
}


@pytest.mark.parametrize("body,message", BAD_DESCRIBE.values(), ids=BAD_DESCRIBE.keys())
def test_bad_describe_input_gets_400_with_a_clear_message(server: Server, body: object, message: str) -> None:
    r = server.post("/v1/describe", body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


BAD_CHAT = {
    "no messages": ({"model": RUN_NAME, "messages": []}, 400, "no user message"),
    "no user message": ({"model": RUN_NAME, "messages": [{"role": "system", "content": "x"}]}, 400, "no user"),
    "empty user message": ({"model": RUN_NAME, "messages": [{"role": "user", "content": " "}]}, 400, "is empty"),
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "Mug"}]}, 404, "does not exist"),
    "n above 1": ({"model": RUN_NAME, "n": 2, "messages": [{"role": "user", "content": "Mug"}]}, 400, "n=2"),
    "max_tokens over cap": ({"model": RUN_NAME, "max_tokens": 5000, "messages": [{"role": "user", "content": "M"}]},
                            400, "max_tokens=5000"),
    "messages not a list": ({"model": RUN_NAME, "messages": "Mug"}, 400, "messages: Input should be a valid list"),
    "missing model": ({"messages": [{"role": "user", "content": "Mug"}]}, 400, "model: Field required"),
}


@pytest.mark.parametrize("body,status,message", BAD_CHAT.values(), ids=BAD_CHAT.keys())
def test_bad_chat_input_gets_4xx_with_a_clear_message(server: Server, body: dict, status: int, message: str) -> None:
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b'{"titles": [', b"", b"\xff\xfe not utf-8", b"titles=Mug"])
def test_malformed_json_gets_400(server: Server, raw: bytes) -> None:
    r = httpx.post(server.url + "/v1/describe", content=raw, headers=server.auth())
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


def test_wrong_method_and_unknown_path_get_json_errors(server: Server) -> None:
    wrong = httpx.get(server.url + "/v1/describe", headers=server.auth())
    missing = httpx.get(server.url + "/v1/nothing", headers=server.auth())
    assert (wrong.status_code, missing.status_code) == (405, 404)
    assert "use POST" in wrong.json()["error"]["message"]
    assert "no such endpoint" in missing.json()["error"]["message"]
    assert httpx.get(server.url + "/healthz").status_code == 200  # still up after all the bad input


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/v1/describe"])
@pytest.mark.parametrize("key,status", [(None, 401), ("wrong", 401), (KEY, None)])
def test_api_key_is_required_except_on_healthz_and_the_page(server: Server, path: str, key, status) -> None:
    headers = server.auth(key) if key else {}
    if path == "/v1/describe":
        r = httpx.post(server.url + path, json={"titles": ["Mug"], "max_new_tokens": 4}, headers=headers)
    else:
        r = httpx.get(server.url + path, headers=headers)
    assert r.status_code == (status or 200)
    if status == 401:
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/").status_code == 200


def test_openai_client_with_a_wrong_key_raises_authentication_error(server: Server) -> None:
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_page_is_one_self_contained_html_file(server: Server) -> None:
    r = httpx.get(server.url + "/")
    assert r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "getReader" in r.text
    assert "src=\"http" not in r.text and "href=\"http" not in r.text  # no external assets


def test_a_plain_model_dir_serves_one_model_without_base(tiny_run: Path) -> None:
    from prodesc.generate import Generator

    gen = Generator.from_model(str(tiny_run / "base"))  # a dir without adapter, like a merged export

    async def main():
        transport = httpx.ASGITransport(app=create_app(gen, ServeConfig()))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
            models = (await http.get("/v1/models")).json()
            body = {"model": "base", "max_tokens": 4, "messages": [{"role": "user", "content": "Red Mug"}]}
            return models, await http.post("/v1/chat/completions", json=body)

    models, answer = asyncio.run(main())
    assert [m["id"] for m in models["data"]] == ["base"]
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 4


def test_a_catalog_aware_run_answers_with_the_neighbours_in_its_prompt(tiny_rag_run: Path) -> None:
    from prodesc.generate import Generator

    gen = Generator.from_run(tiny_rag_run, merge=False)

    async def main():
        transport = httpx.ASGITransport(app=create_app(gen, ServeConfig()))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            body = {"titles": ["Red Mug"], "max_new_tokens": 3}
            chat = {"model": tiny_rag_run.name, "max_tokens": 3, "messages": [{"role": "user", "content": "Red Mug"}]}
            return await http.post("/v1/describe", json=body), await http.post("/v1/chat/completions", json=chat)

    described, chat = asyncio.run(main())
    [answer] = described.json()["descriptions"]
    assert [n["uid"] for n in answer["neighbours"]] == [n["uid"] for n in gen.neighbours(["Red Mug"])[0]]
    # the prompt the usage counts holds the neighbours: longer than the plain prompt
    assert chat.json()["usage"]["prompt_tokens"] == len(gen.prompt_ids("Red Mug")) > 40


# ---- the CLI -----------------------------------------------------------------------------------------------------


def test_serve_needs_exactly_one_of_run_or_model() -> None:
    r = CliRunner().invoke(cli_app, ["serve"])
    assert r.exit_code == 1
    assert "exactly one of --run" in r.output


def test_serve_refuses_a_port_in_use_before_loading_the_model(tiny_run: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = CliRunner().invoke(cli_app, ["serve", "--run", str(tiny_run), "--port", str(port)])
    assert r.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.output


def test_serve_reports_a_bad_setting_in_one_line(tiny_run: Path) -> None:
    r = CliRunner().invoke(cli_app, ["serve", "--run", str(tiny_run), "--set", "serve.queue_size=0"])
    assert r.exit_code == 1
    assert "serve.queue_size" in r.output


# ---- in-process with a fake generator: overload, timeout, disconnect, grouping, failures ----------------------


class FakeModel:
    """Stands in for a PeftModel: `disable_adapter()` switches the adapter off."""

    def __init__(self) -> None:
        self.adapter_on = True

    @contextlib.contextmanager
    def disable_adapter(self):
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True


class FakeGenerator:
    """Instant answers unless `gate` is cleared; records every describe call."""

    name = "fake"

    def __init__(self) -> None:
        self.cfg, self.model = ProdescConfig(), FakeModel()
        self.calls: list[tuple[list[str], float, bool]] = []
        self.gate, self.entered, self.fail = threading.Event(), threading.Event(), False
        self.gate.set()

    def describe(self, titles, gen, progress=False, adapter=True):
        self.calls.append((list(titles), gen.temperature, adapter))
        self.entered.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("CUDA out of memory (fake)")
        tag = "tuned" if adapter else "base"
        return [{"title": t, "prediction": f"{tag}: {t}", "n_tokens": 3, "stopped_by_eos": True, "latency_ms": 1.0}
                for t in titles]

    def stream(self, title, gen):
        tag = "tuned" if self.model.adapter_on else "base"
        yield from [f"{tag}:", "", f" {title}"]


def in_process(scenario, **serve: object):
    """Run `scenario(client, app, gen)` against create_app(FakeGenerator) through httpx's ASGI transport."""
    gen = FakeGenerator()
    cfg = ServeConfig(**{"batch_window_ms": 0, **serve})
    app = create_app(gen, cfg)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
            try:
                return await scenario(http, app, gen)
            finally:
                gen.gate.set()
                await app.state.prodesc.batcher.close()

    return asyncio.run(main())


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_full_queue_answers_503_with_retry_after() -> None:
    async def scenario(http, app, gen):
        gen.gate.clear()
        first = asyncio.create_task(http.post("/v1/describe", json={"titles": ["A"]}))
        await until(gen.entered.is_set)  # A is generating
        queued = asyncio.create_task(http.post("/v1/describe", json={"titles": ["B"]}))
        await until(lambda: app.state.prodesc.batcher.depth == 1)  # B fills the queue
        refused = await http.post("/v1/describe", json={"titles": ["C"]})
        gen.gate.set()
        return refused, await first, await queued

    refused, first, queued = in_process(scenario, queue_size=1, max_batch_size=1)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded"
    assert (first.status_code, queued.status_code) == (200, 200)


def test_slow_generation_answers_504() -> None:
    async def scenario(http, app, gen):
        gen.gate.clear()
        return await http.post("/v1/describe", json={"titles": ["A"]})

    r = in_process(scenario, request_timeout_s=0.2)
    assert r.status_code == 504
    assert "request_timeout_s" in r.json()["error"]["message"]


def test_client_that_disconnects_frees_its_slot_and_is_never_generated() -> None:
    async def scenario(http, app, gen):
        gen.gate.clear()
        first = asyncio.create_task(http.post("/v1/describe", json={"titles": ["A"]}))
        await until(gen.entered.is_set)
        hang_up, sent = asyncio.Event(), []
        messages = [{"type": "http.request", "body": json.dumps({"titles": ["B"]}).encode(), "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/describe", "raw_path": b"/v1/describe", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"test")], "client": ("127.0.0.1", 5000),
                 "server": ("test", 80)}
        second = asyncio.create_task(app(scope, receive, send))
        await until(lambda: app.state.prodesc.batcher.depth == 1)
        hang_up.set()
        await second
        depth_after = app.state.prodesc.batcher.depth
        gen.gate.set()
        assert (await first).status_code == 200
        metrics = (await http.get("/metrics")).text
        return depth_after, sent[0]["status"], metrics

    depth_after, status, metrics = in_process(scenario, max_batch_size=1)
    assert depth_after == 0
    assert status == 499
    assert 'prodesc_requests_total{endpoint="/v1/describe",status="499"} 1.0' in metrics
    assert "prodesc_generation_calls_total 1.0" in metrics  # only A was generated


def test_requests_with_the_same_params_share_a_call_and_others_wait_their_turn() -> None:
    async def scenario(http, app, gen):
        bodies = [{"titles": [f"T{i}"], "temperature": 0.0 if i % 2 else 0.7} for i in range(5)]
        bodies.append({"titles": ["B"], "model": "fake-base"})
        responses = await asyncio.gather(*(http.post("/v1/describe", json=b) for b in bodies))
        return responses, gen.calls

    responses, calls = in_process(scenario, batch_window_ms=300)
    assert [r.status_code for r in responses] == [200] * 6
    assert sorted((sorted(titles), temp, adapter) for titles, temp, adapter in calls) == [
        (["B"], 0.0, False), (["T0", "T2", "T4"], 0.7, True), (["T1", "T3"], 0.0, True)]
    assert responses[5].json()["descriptions"][0]["description"] == "base: B"


def test_generation_failure_answers_500_and_the_server_keeps_serving() -> None:
    async def scenario(http, app, gen):
        gen.fail = True
        failed = await http.post("/v1/describe", json={"titles": ["A"]})
        gen.fail = False
        return failed, await http.post("/v1/describe", json={"titles": ["A"]})

    failed, ok = in_process(scenario)
    assert failed.status_code == 500
    assert failed.json()["error"] == {"message": "generation failed: RuntimeError: CUDA out of memory (fake)",
                                      "type": "server_error", "param": None, "code": None}
    assert ok.status_code == 200


def test_stream_sends_openai_chunks_then_done_and_base_streams_without_adapter() -> None:
    async def scenario(http, app, gen):
        out = []
        for model in ("fake", "fake-base"):
            body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "Red Mug"}]}]}
            out.append(await http.post("/v1/chat/completions", json=body))
        return out

    for r, tag in zip(in_process(scenario), ("tuned", "base"), strict=True):
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == f"{tag}: Red Mug"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_body_over_the_size_cap_gets_413() -> None:
    async def scenario(http, app, gen):
        return await http.post("/v1/describe", content=b'{"titles": ["' + b"x" * 200_000 + b'"]}')

    r = in_process(scenario, max_titles=2, max_title_chars=100)
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_two_apps_in_one_process_keep_separate_metrics() -> None:
    async def scenario(http, app, gen):
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(FakeGenerator(), ServeConfig())),
                                  base_url="http://other")
        await http.post("/v1/describe", json={"titles": ["A"]})
        async with other:
            return (await other.get("/metrics")).text

    assert "prodesc_generation_calls_total 0.0" in in_process(scenario)
