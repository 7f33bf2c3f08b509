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
from prodesc.specs import unsupported

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
    # prodesc's review flag rides beside `choices`, in the plain answer and in the stream's finish chunk
    flag = unsupported(plain.choices[0].message.content, ["Blue Lamp 12"])
    assert plain.model_extra["unsupported"] == flag == chunks[-1].model_extra["unsupported"]


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
    assert all(set(d) == {"title", "description", "n_tokens", "stopped_by_eos", "unsupported"} for d in out)
    assert all(1 <= d["n_tokens"] <= 12 for d in out)
    for d in out:  # the review flag: what the answer states that its title does not (this run shows no neighbours)
        assert d["unsupported"] == unsupported(d["description"], [d["title"]])


def test_fifty_concurrent_requests_share_decode_steps(server: Server) -> None:
    steps_before, rows_before = server.metric("prodesc_decode_steps_total"), server.metric("prodesc_batch_size_sum")
    with httpx.Client(headers=server.auth(), timeout=60) as http, ThreadPoolExecutor(50) as pool:
        def one(i: int) -> httpx.Response:
            return http.post(server.url + "/v1/describe", json={"titles": [f"Red Mug {i}"], "max_new_tokens": 8})

        responses = list(pool.map(one, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert [r.json()["descriptions"][0]["title"] for r in responses] == [f"Red Mug {i}" for i in range(50)]
    steps = server.metric("prodesc_decode_steps_total") - steps_before
    rows = server.metric("prodesc_batch_size_sum") - rows_before  # row-tokens: at most 8 a request
    assert 1 <= steps < 50 * 8 and rows / steps > 2, f"{steps} steps for {rows} row-tokens: rows did not share"


def test_metrics_expose_requests_latency_tokens_and_batch_sizes(server: Server) -> None:
    server.post("/v1/describe", {"titles": ["Red Mug 5", "Blue Mug 6"], "max_new_tokens": 8})
    assert server.metric("prodesc_requests_total", endpoint="/v1/describe", status="200") >= 1
    assert server.metric("prodesc_request_latency_seconds_count", endpoint="/v1/describe") >= 1
    assert server.metric("prodesc_generated_tokens_total") > 0
    assert server.metric("prodesc_tokens_per_second") > 0
    assert server.metric("prodesc_batch_size_count") >= 1
    assert server.metric("prodesc_batch_size_bucket", le="1.0") < server.metric("prodesc_batch_size_bucket", le="+Inf")
    phases = {p: server.metric("prodesc_engine_seconds", phase=p) for p in ("prefill", "forward", "choose", "emit")}
    assert all(v > 0 for v in phases.values()), phases  # where the model thread's time goes, per step phase
    prefills = server.metric("prodesc_prefills_total")
    assert 1 <= prefills <= server.metric("prodesc_prefill_rows_total")  # this request's 2 titles among them


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
    "stop strings": ({"model": RUN_NAME, "stop": ["\n"], "messages": [{"role": "user", "content": "Mug"}]}, 400,
                     "stop sequences are not supported"),  # they used to be ignored silently
    "a stop string": ({"model": RUN_NAME, "stop": ".", "messages": [{"role": "user", "content": "Mug"}]}, 400,
                      "stop sequences are not supported"),
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
    assert '"Content-Type": "application/json"' in r.text  # what a key-less server requires of its POSTs
    assert "src=\"http" not in r.text and "href=\"http" not in r.text  # no external assets


def test_a_plain_model_dir_serves_one_model_without_base(tiny_run: Path) -> None:
    from prodesc.generate import Generator

    gen = Generator.from_model(str(tiny_run / "base"))  # a dir without adapter, like a merged export

    async def main():
        transport = httpx.ASGITransport(app=create_app(gen, ServeConfig()))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as http:
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
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as http:
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


def test_serve_refuses_grounded_decoding_it_would_not_apply(tiny_run: Path) -> None:
    r = CliRunner().invoke(cli_app, ["serve", "--run", str(tiny_run), "--set", "generate.grounded=prompt"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "generate.grounded=prompt, serve: the serving engine does not hold back specifics" in r.output


# ---- in-process with a fake generator: overload, timeout, disconnect, grouping, failures ----------------------


class FakeTok:
    """Token ids for whole strings, so a fake answer decodes to known text."""

    eos_token_id, pad_token_id = 0, 1

    def __init__(self) -> None:
        self.words = ["<eos>", "<pad>"]

    def id(self, word: str) -> int:
        if word not in self.words:
            self.words.append(word)
        return self.words.index(word)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words[i] for i in ids if i > 1)


class FakeEngine:
    """Stands in for generate.continuous.Engine: every step admits the rows waiting (recorded in `gen.calls`) and
    gives each live row one token: "<tag>:", " <title>", then " more" until `gen.tokens` with EOS. Unless `gate`
    is cleared (then a step blocks, deaf to stop, like a hung forward pass); `tick` seconds per step."""

    def __init__(self, gen: FakeGenerator, slots: int) -> None:
        self.gen, self.slots = gen, slots
        self.rows, self.waiting = [], []

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, row) -> None:
        self.waiting.append(row)

    def fail(self):
        rows, self.rows, self.waiting = self.rows + self.waiting, [], []
        return rows

    def step(self) -> int:
        gen = self.gen
        for group in (self.rows, self.waiting):
            for row in [r for r in group if not r.wanted()]:
                group.remove(row)
                row.on_end("cancelled")
        new = self.waiting[: self.slots - len(self.rows)]
        del self.waiting[: len(new)]
        if new:
            gen.calls.append(([gen.tok.words[r.prompt[0]] for r in new], [r.temperature for r in new], gen.tag))
        self.rows += new
        gen.entered.set()
        gen.gate.wait(10)
        if gen.fail:
            raise RuntimeError("CUDA out of memory (fake)")
        for row in self.rows:
            row.tokens.append(self.next_token(row))
            gen.produced += 1
            if row.tokens[-1] != FakeTok.eos_token_id:
                row.on_token(row.tokens[-1])
        for row in list(self.rows):
            if row.tokens[-1] == FakeTok.eos_token_id or len(row.tokens) >= row.max_new_tokens:
                self.rows.remove(row)
                row.on_end("stop" if row.tokens[-1] == FakeTok.eos_token_id else "length")
        time.sleep(gen.tick)
        return len(self.rows) + len(new)

    def next_token(self, row) -> int:
        tok, n = self.gen.tok, len(row.tokens)
        if n + 1 >= self.gen.tokens:
            return FakeTok.eos_token_id
        return tok.id([f"{self.gen.tag}:", f" {tok.words[row.prompt[0]]}"][n] if n < 2 else " more")


class FakeGenerator:
    """Instant 3-token answers ("<tag>: <title>" + EOS) unless `gate` is cleared; `tokens` and `tick` make slow,
    long answers that, like the real engine, stop rows as soon as nobody wants them."""

    def __init__(self, tag: str = "tuned") -> None:
        self.name = "fake" if tag == "tuned" else "fake-base"
        self.tag, self.cfg, self.tok = tag, ProdescConfig(), FakeTok()
        self.calls: list[tuple[list[str], list[float], str]] = []  # (titles admitted, temperatures, tag) a step
        self.gate, self.entered, self.fail, self.die = threading.Event(), threading.Event(), False, False
        self.gate.set()
        self.tokens, self.tick, self.produced = 3, 0.0, 0  # tokens per answer, seconds per step, tokens made
        self.base: FakeGenerator | None = None
        self.compiles: list[bool | None] = []  # `compile` of each engine made (None: the generator's choice)

    def prompt_ids(self, title: str) -> list[int]:
        return [self.tok.id(title)]

    def engine(self, slots: int, cache_len: int, admit_wait_s: float = 0.0, compile: bool | None = None) -> FakeEngine:
        self.compiles.append(compile)
        return FakeEngine(self, slots)

    def load_base(self) -> FakeGenerator:
        self.base = FakeGenerator("base")
        self.base.tok = self.tok
        return self.base


def in_process(scenario, api_key: str | None = None, gen: FakeGenerator | None = None, **serve: object):
    """Run `scenario(client, app, gen)` against create_app(gen, a FakeGenerator by default) through httpx's ASGI
    transport."""
    gen = gen or FakeGenerator()
    cfg = ServeConfig(**{"batch_window_ms": 0, **serve})
    app = create_app(gen, cfg, api_key, base=gen.load_base)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as http:
            try:
                return await scenario(http, app, gen)
            finally:
                gen.gate.set()
                gen.die = False
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
        second = _asgi_call(app, "/v1/describe", {"titles": ["B"]}, hang_up, sent)
        await until(lambda: app.state.prodesc.batcher.depth == 1)
        hang_up.set()
        await second
        depth_after = app.state.prodesc.batcher.depth
        gen.gate.set()
        assert (await first).status_code == 200
        metrics = (await http.get("/metrics")).text
        return depth_after, sent[0]["status"], metrics, gen.calls

    depth_after, status, metrics, calls = in_process(scenario, max_batch_size=1)
    assert depth_after == 0
    assert status == 499
    assert 'prodesc_requests_total{endpoint="/v1/describe",status="499"} 1.0' in metrics
    assert [titles for titles, _, _ in calls] == [["A"]]  # B was never generated


def test_requests_with_different_settings_join_one_batch_and_base_runs_on_its_own_copy() -> None:
    async def scenario(http, app, gen):
        await http.post("/v1/describe", json={"titles": ["B0"], "model": "fake-base"})  # loads the base copy
        bodies = [{"titles": [f"T{i}"], "temperature": 0.0 if i % 2 else 0.7} for i in range(5)]
        bodies.append({"titles": ["B"], "model": "fake-base"})
        responses = await asyncio.gather(*(http.post("/v1/describe", json=b) for b in bodies))
        return responses, gen.calls, gen.base.calls, (gen.compiles, gen.base.compiles)

    responses, calls, base_calls, compiles = in_process(scenario, batch_window_ms=300)
    assert [r.status_code for r in responses] == [200] * 6
    [(titles, temps, _)] = calls  # one prefill: greedy and sampled rows side by side
    assert sorted(zip(titles, temps, strict=True)) == [("T0", 0.7), ("T1", 0.0), ("T2", 0.7), ("T3", 0.0),
                                                       ("T4", 0.7)]
    assert [t for t, _, _ in base_calls] == [["B0"], ["B"]]
    assert responses[5].json()["descriptions"][0]["description"] == "base: B"
    assert responses[0].json()["descriptions"][0]["description"] == "tuned: T0"
    # the base loads under traffic: its steps are captured uncompiled (compiling holds the GIL for most of a minute)
    assert compiles == ([None], [False])


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


def test_a_stream_that_fell_behind_gets_its_pending_pieces_as_one_event() -> None:
    """Pieces that queued up while the client was slow go out as one content delta, not one event each."""
    from prodesc.serve.app import _sse
    from prodesc.serve.batching import DONE

    async def events() -> list[str]:
        svc = create_app(FakeGenerator(), ServeConfig()).state.prodesc
        pieces: asyncio.Queue = asyncio.Queue()
        for item in ["Red", " Mug", " for", " tea", {"n_tokens": 4, "prompt_tokens": 9, "finish_reason": "length"},
                     DONE]:
            pieces.put_nowait(item)
        return [e async for e in _sse(svc, pieces, {"id": "x"}, time.monotonic() + 5, include_usage=True)]

    chunks = [json.loads(e.removeprefix("data: ")) for e in asyncio.run(events())[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks if c["choices"]] == [
        {"role": "assistant", "content": ""}, {"content": "Red Mug for tea"}, {}]
    assert chunks[2]["choices"][0]["finish_reason"] == "length" and chunks[3]["usage"]["completion_tokens"] == 4


def test_body_over_the_size_cap_gets_413() -> None:
    async def scenario(http, app, gen):
        return await http.post("/v1/describe", content=b'{"titles": ["' + b"x" * 200_000 + b'"]}')

    r = in_process(scenario, max_titles=2, max_title_chars=100)
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_two_apps_in_one_process_keep_separate_metrics() -> None:
    async def scenario(http, app, gen):
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(FakeGenerator(), ServeConfig())),
                                  base_url="http://localhost")
        await http.post("/v1/describe", json={"titles": ["A"]})
        async with other:
            return (await other.get("/metrics")).text

    assert "prodesc_decode_steps_total 0.0" in in_process(scenario)


# ---- hardening (issue 13): no jam, no work for nobody, no open door, no 500 -------------------------------------


def test_a_timed_out_request_stops_its_generation_so_the_next_one_is_served() -> None:
    async def scenario(http, app, gen):
        gen.tokens, gen.tick = 10_000, 0.002  # ~2 s of generation, far past the 0.5 s deadline
        late = await http.post("/v1/describe", json={"titles": ["A"], "max_new_tokens": 1024})
        gen.tokens, gen.tick = 3, 0.0
        after = await http.post("/v1/describe", json={"titles": ["B"]})  # waits for A's call to give the thread back
        return late, after, gen.produced, (await http.get("/metrics")).text

    late, after, produced, metrics = in_process(scenario, request_timeout_s=0.5)
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
    assert after.status_code == 200, after.text
    assert produced < 2000  # stopped within a few tokens of the deadline, not after 10,000
    assert "prodesc_delivered_tokens_total 3.0" in metrics  # B's answer; A's tokens were generated for nobody
    generated = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("prodesc_generated_tokens_total"))
    assert generated > 3


def _asgi_call(app, path: str, body: dict, hang_up: asyncio.Event, sent: list):
    """Call the app as uvicorn does, with a client that hangs up when `hang_up` is set."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]}
    return asyncio.create_task(app(scope, receive, send))


def test_a_stream_whose_client_leaves_stops_within_a_few_tokens() -> None:
    async def scenario(http, app, gen):
        gen.tokens, gen.tick = 10_000, 0.002  # ~20 s of streaming
        hang_up, sent = asyncio.Event(), []
        body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "Red Mug"}]}
        call = _asgi_call(app, "/v1/chat/completions", body, hang_up, sent)
        await until(lambda: any(b" more" in m.get("body", b"") for m in sent))
        hang_up.set()
        at_hang_up = gen.produced
        await asyncio.wait_for(call, 5)
        gen.tokens, gen.tick = 3, 0.0
        after = await http.post("/v1/describe", json={"titles": ["B"]})  # served once the stream let go
        return after, gen.produced - 3 - at_hang_up

    after, extra = in_process(scenario, request_timeout_s=3)
    assert after.status_code == 200, after.text
    assert extra <= 10, f"{extra} tokens generated after the client left"


def test_healthz_answers_503_while_the_model_thread_is_stuck_and_recovers() -> None:
    async def scenario(http, app, gen):
        gen.gate.clear()  # a call deaf to stop: a hung forward pass
        late = await http.post("/v1/describe", json={"titles": ["A"]})
        await until(lambda: app.state.prodesc.batcher.overdue() > 0.3)
        stuck = await http.get("/healthz")
        gen.gate.set()
        await until(lambda: app.state.prodesc.batcher.overdue() == 0)
        return late, stuck, await http.get("/healthz")

    late, stuck, healthy = in_process(scenario, request_timeout_s=0.2, stuck_after_s=0.3)
    assert late.status_code == 504
    assert stuck.status_code == 503 and stuck.json()["status"] == "stuck"
    assert "serve.stuck_after_s" in stuck.json()["detail"]
    assert healthy.status_code == 200 and healthy.json()["status"] == "ok"


def test_decoding_params_reach_the_model_normalised() -> None:
    async def scenario(http, app, gen):
        tiny = {"titles": ["A"], "temperature": 1e-300, "top_p": 0.5}
        chat = {"model": "fake", "temperature": 5e-324, "messages": [{"role": "user", "content": "B"}]}
        answers = await asyncio.gather(http.post("/v1/describe", json=tiny),
                                       http.post("/v1/chat/completions", json=chat),
                                       http.post("/v1/describe", json={"titles": ["C"], "temperature": 0}))
        return answers, gen.calls

    answers, calls = in_process(scenario, batch_window_ms=200)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [(sorted(titles), temps) for titles, temps, _ in calls] == [(["A", "B", "C"], [0.0, 0.0, 0.0])]


HOSTILE = {
    "NaN temperature": (b'{"titles": ["Mug"], "temperature": NaN}', "NaN is not a JSON number"),
    "Infinity top_p": (b'{"titles": ["Mug"], "top_p": Infinity}', "Infinity is not a JSON number"),
    "overflowing temperature": (b'{"titles": ["Mug"], "temperature": 1e999}', "finite number"),
    "nested past the recursion limit": (b'{"titles": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper"),
    "nested past the depth cap": (b'{"titles": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper"),
    "lone surrogate title": (b'{"titles": ["Mug \\ud800"]}', "lone surrogate"),
    "lone surrogate key": (b'{"titles": ["Mug"], "\\udfff": 1}', "lone surrogate"),
    "lone surrogate chat": (b'{"model": "fake", "messages": [{"role": "user", "content": "\\ud800"}]}',
                            "lone surrogate"),
    "huge integer": (b'{"titles": ["Mug"], "max_new_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
}


@pytest.mark.parametrize("raw,message", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_bodies_get_400_with_an_openai_error_never_500(raw: bytes, message: str) -> None:
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/describe"

    async def scenario(http, app, gen):
        return await http.post(path, content=raw, headers={"Content-Type": "application/json"}), gen.calls

    r, calls = in_process(scenario, max_titles=2000, max_title_chars=100)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert message in r.json()["error"]["message"]
    assert calls == []


LOOPBACK_HOSTS = ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:8000", "[::1]:8000"]
FOREIGN_HOSTS = ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", ""]


def test_a_keyless_loopback_server_answers_only_loopback_host_names() -> None:
    async def scenario(http, app, gen):
        out = {}
        for host in LOOPBACK_HOSTS + FOREIGN_HOSTS:
            for path in ("/", "/healthz", "/v1/models"):
                out[host, path] = (await http.get(path, headers={"Host": host})).status_code
            out[host, "describe"] = (await http.post("/v1/describe", json={"titles": ["A"]},
                                                     headers={"Host": host})).status_code
        return out

    statuses = in_process(scenario)
    assert {k: v for k, v in statuses.items() if k[0] in LOOPBACK_HOSTS} == {
        (h, p): 200 for h in LOOPBACK_HOSTS for p in ("/", "/healthz", "/v1/models", "describe")}
    assert set(v for k, v in statuses.items() if k[0] in FOREIGN_HOSTS) == {421}


@pytest.mark.parametrize("api_key,host,status", [("k", None, 401), (None, "0.0.0.0", 200)])
def test_host_names_are_not_checked_with_a_key_or_off_loopback(api_key, host, status) -> None:
    async def scenario(http, app, gen):
        return await http.get("/v1/models", headers={"Host": "evil.example"})

    r = in_process(scenario, api_key, **({"host": host} if host else {}))
    assert r.status_code == status


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None, "application/jsonp"])
def test_a_keyless_server_takes_only_json_bodies(content_type) -> None:
    async def scenario(http, app, gen):
        headers = {"Content-Type": content_type} if content_type else {}
        refused = await http.post("/v1/describe", content=b'{"titles": ["A"]}', headers=headers)
        charset = await http.post("/v1/describe", content=b'{"titles": ["A"]}',
                                  headers={"Content-Type": "application/json; charset=utf-8"})
        return refused, charset, gen.calls

    refused, charset, calls = in_process(scenario)
    assert refused.status_code == 415
    assert "Content-Type: application/json" in refused.json()["error"]["message"]
    assert charset.status_code == 200 and len(calls) == 1  # the refused one never reached the model


def test_cors_headers_only_for_configured_origins() -> None:
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}

    async def scenario(http, app, gen):
        return (await http.options("/v1/describe", headers=preflight),
                await http.post("/v1/describe", json={"titles": ["A"]}, headers={"Origin": "https://shop.example"}),
                await http.post("/v1/describe", json={"titles": ["A"]}, headers={"Origin": "https://evil.example"}))

    closed = in_process(scenario)
    assert all("access-control-allow-origin" not in r.headers for r in closed)
    opened = in_process(scenario, cors_origins=["https://shop.example"])
    assert opened[0].status_code == 200
    assert opened[0].headers["access-control-allow-origin"] == "https://shop.example"
    assert opened[1].headers["access-control-allow-origin"] == "https://shop.example"
    assert "access-control-allow-origin" not in opened[2].headers


@pytest.mark.parametrize("how", ["flag", "env", "blank flag"])
def test_an_empty_api_key_refuses_to_start(how: str, tmp_path: Path) -> None:
    args, env = ["serve", "--run", str(tmp_path)], {}
    if how == "env":
        env["PRODESC_API_KEY"] = ""
    else:
        args += ["--api-key", "" if how == "flag" else "  "]
    r = CliRunner().invoke(cli_app, args, env=env)
    assert r.exit_code == 1
    assert "empty API key" in r.output and len(r.output.strip().splitlines()) == 1


def test_create_app_refuses_an_empty_api_key() -> None:
    from prodesc.errors import ProdescError

    with pytest.raises(ProdescError, match="empty API key"):
        create_app(FakeGenerator(), ServeConfig(), "")


def test_the_stream_that_jammed_the_server_is_answered_greedily(server: Server) -> None:
    """Issue 13's one-line jam: a streamed temperature of 1e-300 held the model thread for good."""
    body = {"model": RUN_NAME, "stream": True, "temperature": 1e-300, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Red Mug"}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.auth(), timeout=30) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    greedy = server.post("/v1/describe", {"titles": ["Red Mug"], "max_new_tokens": 16, "temperature": 0}).json()
    assert text.strip() == greedy["descriptions"][0]["description"]
    assert server.post("/v1/describe", {"titles": ["Red Mug"], "temperature": 1e-300}).status_code == 200
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


@pytest.mark.parametrize("raw", [b'{"titles": ["Mug \\ud800"]}', b'{"titles": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                                 b'{"titles": ["Mug"], "temperature": NaN}'], ids=["surrogate", "nested", "NaN"])
def test_hostile_bodies_get_400_from_the_real_server(server: Server, raw: bytes) -> None:
    r = httpx.post(server.url + "/v1/describe", content=raw, headers=server.auth(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_real_stream_whose_client_leaves_stops_generating(server: Server) -> None:
    before = server.metric("prodesc_generated_tokens_total")
    body = {"model": f"{RUN_NAME}-base", "stream": True, "max_tokens": 1024,  # ~1000 tokens unless stopped
            "messages": [{"role": "user", "content": "zzz qq"}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.auth(), timeout=30) as r:
        next(line for line in r.iter_lines() if '"content": "' in line and '"content": ""' not in line)
    t0 = time.monotonic()
    after = server.post("/v1/describe", {"titles": ["Blue Lamp"], "max_new_tokens": 1})  # queued behind the stream
    waited = time.monotonic() - t0
    generated = server.metric("prodesc_generated_tokens_total") - before - 1
    assert after.status_code == 200 and waited < 5
    assert generated < 100, f"{generated} tokens generated for a client that left after its first piece"


def test_a_stream_past_its_deadline_ends_with_a_timeout_event_not_a_finish() -> None:
    async def scenario(http, app, gen):
        gen.tokens, gen.tick = 10_000, 0.002
        body = {"model": "fake", "stream": True, "max_tokens": 1024,
                "messages": [{"role": "user", "content": "Red Mug"}]}
        r = await http.post("/v1/chat/completions", json=body)
        gen.tokens, gen.tick = 3, 0.0
        return r, await http.post("/v1/describe", json={"titles": ["B"]}), gen.produced

    r, after, produced = in_process(scenario, request_timeout_s=0.4)
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert json.loads(events[-2])["error"]["type"] == "timeout" and events[-1] == "[DONE]"
    assert not any('"finish_reason": "' in e for e in events)  # never handed over as if complete
    assert after.status_code == 200 and produced < 2000


# ---- the event loop does no model work; engines warm up before traffic; a dead model thread is reported -------


class WarmEngine(FakeEngine):
    """A FakeEngine with `warm_up` (the real engine's CUDA graph capture), recording the thread it ran on."""

    def __init__(self, gen: FakeGenerator, slots: int) -> None:
        super().__init__(gen, slots)
        self.warmed_on: str | None = None
        self.steps_before_warm = None

    def warm_up(self) -> None:
        self.gen.warm_calls += 1
        if self.gen.warm_fails:
            raise RuntimeError("CUDA graph capture failed (fake)")
        self.warmed_on = threading.current_thread().name

    def step(self) -> int:
        self.gen.stepped_cold |= self.warmed_on is None and not self.gen.warm_fails
        return super().step()


class ThreadRecordingGenerator(FakeGenerator):
    def __init__(self, tag: str = "tuned") -> None:
        super().__init__(tag)
        self.prompt_threads: set[str] = set()
        self.warm_calls, self.warm_fails, self.stepped_cold = 0, False, False
        self.neighbour_calls, self.neighbours_fail = 0, False

    def neighbours(self, titles):
        self.prompt_threads.add(threading.current_thread().name)
        self.neighbour_calls += 1
        if self.neighbours_fail:
            raise RuntimeError("embedder missing (fake)")
        return [[] for _ in titles]

    def prompt_ids(self, title: str) -> list[int]:
        self.prompt_threads.add(threading.current_thread().name)
        return super().prompt_ids(title)

    def engine(self, slots: int, cache_len: int, admit_wait_s: float = 0.0, compile: bool | None = None) -> WarmEngine:
        return WarmEngine(self, slots)

    def load_base(self) -> ThreadRecordingGenerator:
        self.base = ThreadRecordingGenerator("base")
        self.base.tok, self.base.warm_fails = self.tok, self.warm_fails
        return self.base


def _with_lifespan(gen, scenario, raise_app_exceptions=True, **serve):
    """create_app(gen) with its lifespan run (start-up warm-up, shutdown), as uvicorn runs it."""
    app = create_app(gen, ServeConfig(**{"batch_window_ms": 0, **serve}), None, base=gen.load_base)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as http:
                return await scenario(http, app, gen)

    return asyncio.run(main())


def test_neighbours_and_prompts_are_built_off_the_event_loop() -> None:
    """Embedding and searching neighbours (CUDA work for retrieval.k > 0) used to run on the event loop, beside a
    CUDA graph capture on the model thread."""
    gen = ThreadRecordingGenerator()

    async def scenario(http, app, gen):
        loop_thread = threading.current_thread().name
        answers = await asyncio.gather(*(http.post("/v1/describe", json={"titles": [f"T{i}", "U"]})
                                         for i in range(4)))
        base = await http.post("/v1/describe", json={"titles": ["B"], "model": "fake-base"})
        return loop_thread, answers, base

    loop_thread, answers, base = _with_lifespan(gen, scenario)
    assert [r.status_code for r in answers] == [200] * 4 and base.status_code == 200
    threads = gen.prompt_threads | gen.base.prompt_threads
    assert threads and loop_thread not in threads
    assert all(name.startswith("prodesc-prompts") for name in threads)


def test_engines_warm_up_before_their_first_request_and_a_failed_warm_up_still_answers() -> None:
    for fails in (False, True):
        gen = ThreadRecordingGenerator()
        gen.warm_fails = fails

        async def scenario(http, app, gen):
            warmed_at_start = (gen.warm_calls, gen.neighbour_calls)
            tuned = await http.post("/v1/describe", json={"titles": ["A"]})
            base = await http.post("/v1/describe", json={"titles": ["B"], "model": "fake-base"})
            stream = await http.post("/v1/chat/completions", json={
                "model": "fake-base", "stream": True, "messages": [{"role": "user", "content": "C"}]})
            return warmed_at_start, tuned, base, stream, (await http.get("/healthz")).json()

        warmed_at_start, tuned, base, stream, health = _with_lifespan(gen, scenario)
        assert warmed_at_start == (1, 1)  # engine and prompt path (embedder, catalog) before the server took a request
        assert gen.base.warm_calls == 1 and not gen.stepped_cold and not gen.base.stepped_cold
        assert gen.base.neighbour_calls == 3  # its own warm-up, then the two requests'
        assert (tuned.status_code, base.status_code, stream.status_code) == (200, 200, 200)  # never a 500
        assert "data: [DONE]" in stream.text and '"error"' not in stream.text
        assert health["graphs"] == {"fake": None, "fake-base": None}  # fakes have no graphs attribute


def test_a_failed_prompt_warm_up_still_starts_the_server_and_requests_get_a_clear_error() -> None:
    gen = ThreadRecordingGenerator()
    gen.neighbours_fail = True

    async def scenario(http, app, gen):
        return (await http.get("/healthz")).status_code, await http.post("/v1/describe", json={"titles": ["A"]})

    health, answer = _with_lifespan(gen, scenario, raise_app_exceptions=False)  # as a real client sees it
    assert health == 200 and gen.neighbour_calls == 2  # the warm-up tried, then the request
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"


class DyingEngine(FakeEngine):
    """The model thread's loop itself fails (a bug outside a step): the thread ends."""

    @property
    def busy(self) -> bool:
        if self.gen.die:
            raise RuntimeError("a bug in the loop (fake)")
        return bool(self.rows or self.waiting)


def test_healthz_answers_503_once_the_model_thread_has_died_and_requests_get_503_not_a_hang() -> None:
    async def scenario(http, app, gen):
        gen.die = False
        ok = await http.post("/v1/describe", json={"titles": ["A"]})
        gen.die = True
        app.state.prodesc.batcher._wake.set()
        await until(lambda: app.state.prodesc.batcher.dead is not None)
        return ok, await http.get("/healthz"), await http.post("/v1/describe", json={"titles": ["B"]})

    gen = FakeGenerator()
    gen.engine = lambda slots, cache_len, admit_wait_s=0.0, compile=None: DyingEngine(gen, slots)
    ok, health, refused = in_process(scenario, gen=gen)
    assert ok.status_code == 200
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert "model thread died (RuntimeError: a bug in the loop (fake))" in health.json()["detail"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_thread_dead"


def test_a_job_the_engine_refuses_fails_alone_and_the_model_thread_goes_on() -> None:
    async def scenario(http, app, gen):
        engine = app.state.prodesc.batcher.engines[True]
        real_add = engine.add

        def add(row):
            if gen.tok.words[row.prompt[0]] == "Bad":
                raise ValueError("prompt too long (fake)")
            real_add(row)

        engine.add = add
        bad = await http.post("/v1/describe", json={"titles": ["Good", "Bad"]})
        return bad, await http.post("/v1/describe", json={"titles": ["A"]}), app.state.prodesc.batcher.dead

    bad, ok, dead = in_process(scenario)
    assert bad.status_code == 500 and "prompt too long" in bad.json()["error"]["message"]
    assert ok.status_code == 200 and dead is None


@pytest.mark.parametrize("api_key", [None, "k"])
def test_cors_for_every_origin_needs_an_api_key(api_key) -> None:
    from prodesc.errors import ProdescError

    cfg = ServeConfig(cors_origins=["*"])
    if api_key is None:
        with pytest.raises(ProdescError, match=r"cors_origins=\['\*'\] without --api-key"):
            create_app(FakeGenerator(), cfg, api_key)
    else:
        assert create_app(FakeGenerator(), cfg, api_key) is not None


def test_serve_caps_titles_at_the_cap_every_verb_applies() -> None:
    async def scenario(http, app, gen):
        return (await http.post("/v1/describe", json={"titles": ["x" * 1001]}),
                await http.post("/v1/describe", json={"titles": ["x" * 1000]}))

    refused, ok = in_process(scenario)
    assert refused.status_code == 400 and "at most 1000 (data.max_title_chars" in refused.json()["error"]["message"]
    assert ok.status_code == 200


def test_serve_compile_false_captures_the_eager_step() -> None:
    """serve.compile=false: the tuned model's engine is made uncompiled (start-up in seconds, not minutes)."""
    async def scenario(http, app, gen):
        await http.post("/v1/describe", json={"titles": ["A"]})
        return gen.compiles

    assert in_process(scenario, compile=False) == [False]
