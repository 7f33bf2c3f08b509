"""Continuous batching: requests join and leave a running batch token by token (what `prodesc serve` runs on).

    engine = generator.engine(slots=32, cache_len=1536)
    engine.add(Row(prompt_ids, max_new_tokens=64, temperature=0.0, top_p=1.0, on_token=..., on_end=...))
    while engine.busy:
        engine.step()          # rows waiting join (one prefill), every live row's next token is launched, and
                               # the tokens of the previous step (and of the prefill) are handed out

Each row owns a slot of a KV cache shaped [slots, kv_heads, cache_len, head_dim] per layer. All rows write
their next token's keys/values into one shared column `t`, so a decode step has the same shapes whatever the rows
are: a newcomer's prompt is prefilled into the columns just left of `t` in its own slot, and a 4D mask
([rows, 1, 1, cache_len]) tells each row which columns are its own. When `t` reaches the end of the cache,
every slot shifts left by the oldest live row's start. Live rows sit in slots 0..n-1 (a row that leaves is
replaced by the last one), and a step runs the first `batch_bucket(n)` slots: on CUDA each bucket (a power of
two) is captured once as a CUDA graph (a few seconds per bucket, no compile), so a step costs one graph replay
however rows come and go. Each row decodes with its own temperature and top_p (greedy at 0) and stops at EOS,
at its `max_new_tokens`, or as soon as `wanted()` says nobody waits for it any more (within one token).

One decode step is always in flight: `step` launches decode step k+1 (its inputs, the tokens step k chose, are on
the device already) before it waits for step k's tokens and hands them out, so on CUDA the host's work between
steps (handing tokens out, dropping and admitting rows, launching) runs while the device computes instead of
leaving it idle. Newcomers' first tokens (their prefill's) are still handed out in the step that admits them: their
copy to the host is queued ahead of step k+1. The price: a row that ends (stop id, max_new_tokens, or found
unwanted at the start of a step) has had one token chosen past its end, which nobody sees, and its slot is reused
one step later. Tokens go to rows by the list of rows their step was launched for, never by slot, so slot moves
after a launch cannot misroute them; on the device every slot move, prefill and shift comes after the step in
flight (one CUDA stream), so they act on its results. Host-device copies on the way (prompts, sampling settings,
the chosen tokens) go through pinned memory without waiting: a synchronous copy would wait for the step in flight.

With rows generating, a prefill (one eager forward) stalls all of them, so waiting rows are gathered into fewer,
larger prefills under a burst of arrivals: they join once they fill a prefill or the free slots, once a step went
by with no new arrival, or once the oldest has waited `admit_wait_s` (0: at every step). From idle they join at
once (the server waited `serve.batch_window_ms` already).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prodesc.config import MIN_SAMPLING_TEMPERATURE, GenerateConfig
from prodesc.generate.fast import batch_bucket

log = logging.getLogger(__name__)
PREFILL_ROWS = 64  # newcomers prefilled in one forward at most: a bigger prefill would stall the live rows' tokens
# Model-thread time of a step by phase (`Engine.seconds`): on CUDA, prefill, forward and choose only launch work,
# and sync waits for the tokens of the step launched one call earlier (and of the prefill), i.e. for the part of the
# device's work that the host's work did not cover; on CPU everything is host time and sync is ~0.
PHASES = ("prefill", "forward", "choose", "sync", "emit")


@dataclass(eq=False)
class Row:
    """One answer being generated. `on_token(id)` after each new token, then `on_end(reason)` once: "stop" (EOS,
    not passed to on_token), "length" (max_new_tokens), or "cancelled" (`wanted()` turned False)."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    on_token: Callable[[int], None] = lambda _: None
    on_end: Callable[[str], None] = lambda _: None
    wanted: Callable[[], bool] = lambda: True
    tokens: list[int] = field(default_factory=list)
    start: int = 0  # the first cache column of this row's prompt
    deadline: float = math.inf  # for the server's stuck check
    job: Any = None  # the server's request this row answers
    queued_at: float = 0.0  # when `Engine.add` queued it (Engine.clock)


@dataclass
class _Launched:
    """A step on the device: the rows it chose a token for (in slot order at launch) and the tokens, which are on
    the host once `ready` (a CUDA event; None when the copy was synchronous) has fired."""

    rows: list[Row]
    tokens: Any
    ready: Any = None


class Engine:
    """The running batch of one model. Single-threaded: call `add` and `step` from the model thread only."""

    def __init__(self, model: Any, tok: Any, gen: GenerateConfig, slots: int, cache_len: int,
                 graphs: bool = False, stop_ids: list[int] | None = None, admit_wait_s: float = 0.0) -> None:
        self.model, self.gen, self.slots, self.cache_len = model, gen, slots, cache_len
        self.admit_wait_s = admit_wait_s  # with rows live, how long waiting rows may be held to gather a prefill
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        self.stops = set(stop_ids or [self.eos])  # any of them ends a row (models.stop_ids)
        self.exempt = sorted({i for i in [*tok.all_special_ids, *self.stops] if i is not None})
        self.rows: list[Row] = []  # live rows, row i in slot i
        self.waiting: deque[Row] = deque()
        self.graphs = graphs  # CUDA graphs per batch bucket (turned off, with a warning, if capture fails)
        self._kv: list[tuple[Any, Any]] = []  # per layer (keys, values), allocated by the first prefill
        self._t = 0  # the shared write column
        self._mask: Any = None  # [slots, cache_len] bool: the columns each slot's row may attend to
        self._col: Any = None  # [1] long on the model's device: `t` for the decode step's cache writes
        # On the model's device, per slot, so a decode step needs no per-row copy from the host: the token to feed
        # next, its position id, and the answer-only processors' state (generate/processors.py)
        self._last: Any = None
        self._pos: Any = None
        self._procs: Any = None
        self._captured: dict[int, Any] = {}
        self.seconds = dict.fromkeys(PHASES, 0.0)  # summed per phase (/metrics, bench/engine_overhead.py)
        # Prefills so far and the rows they admitted (/metrics): on a GPU each prefill is one eager forward that
        # stalls every live row whatever its size, so many small ones under a burst cost tokens/s.
        self.prefills, self.prefill_rows = 0, 0
        self.clock: Callable[[], float] = time.monotonic  # for the admission wait (tests replace it)
        self._flight: _Launched | None = None  # the decode step launched whose tokens are not handed out yet
        self._joining: list[Row] = []  # taken from `waiting`, not yet in `rows` (for `fail`)
        self._arrivals = 0  # rows added since the previous step
        # Called once a step's work is queued on the device, right before waiting for the previous step's tokens:
        # the server hands the tokens of the previous `step` call to its event loop here, so the loop's Python runs
        # while this thread waits for the GPU (GIL released) instead of fighting it for the GIL while it launches.
        self.on_wait: Callable[[], None] = lambda: None
        # transformers 5.2x renamed past_key_values to cache (the old name warns); older 5.x only know the old one
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, row: Row) -> None:
        """Queue a row; it joins at the next step (or a few later under a burst of arrivals: `admit_wait_s`). Its
        prompt + max_new_tokens must fit in `cache_len`."""
        if len(row.prompt) + row.max_new_tokens > self.cache_len:
            raise ValueError(f"prompt {len(row.prompt)} + {row.max_new_tokens} new tokens > cache_len {self.cache_len}")
        row.queued_at = self.clock()
        self.waiting.append(row)
        self._arrivals += 1

    def step(self) -> int:
        """Drop unwanted rows, admit waiting ones (unwanted ones unprefilled), launch the next decode step for
        every live row, then hand out the tokens of the previous decode step and of the newcomers' prefill;
        returns the number of tokens handed out. Returns with a decode step in flight while rows are live."""
        import torch

        with torch.inference_mode():
            self._drop(lambda r: not r.wanted(), "cancelled")
            joined = self._admit()
            launched = self._decode() if self.rows else None
            self.on_wait()
            handed = self._land(self._flight) if self._flight is not None else 0
            handed += self._land(joined) if joined is not None else 0
            self._flight = launched if self.rows else None  # no live row left: its tokens are all past an end
            return handed

    def fail(self) -> list[Row]:
        """After an error in `step`: forget every row (returned, for their owners), the step in flight and the
        cache contents."""
        rows = self.rows + self._joining + list(self.waiting)
        self.rows, self.waiting, self._joining, self._flight = [], deque(), [], None
        return rows

    # ---- joining: prefill newcomers into free slots ------------------------------------------------------------

    def _admit(self) -> _Launched | None:
        if not self._admitting():
            return None
        new = self._joining = []
        while self.waiting and len(self.rows) + len(new) < self.slots and len(new) < PREFILL_ROWS:
            row = self.waiting.popleft()
            if row.wanted():
                new.append(row)
            else:
                row.on_end("cancelled")
        if not new:
            return None
        t0 = time.perf_counter()
        joined = self._prefill(new)
        self.seconds["prefill"] += time.perf_counter() - t0
        self.prefills, self.prefill_rows = self.prefills + 1, self.prefill_rows + len(new)
        return joined

    def _admitting(self) -> bool:
        """Whether waiting rows join at this step (the policy of the module docstring)."""
        arrivals, self._arrivals = self._arrivals, 0
        if not self.waiting:
            return False
        if not self.rows or self.admit_wait_s <= 0:
            return True
        room = min(PREFILL_ROWS, self.slots - len(self.rows))
        return (len(self.waiting) >= room or arrivals == 0
                or self.clock() - self.waiting[0].queued_at >= self.admit_wait_s)

    def _prefill(self, new: list[Row]) -> _Launched:
        import torch

        width = max(len(r.prompt) for r in new)
        if not self.rows:
            self._t = width
        elif self._t < width:
            self._shift(width - self._t)  # make room left of t (every live row's span fits, so this fits)
        s0, dev = len(self.rows), self.model.device
        ids = self._tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in new])
        real = ids != self.pad
        real[:, -1] = True
        for i, r in enumerate(new):
            real[i, width - len(r.prompt):] = True  # a pad id inside a prompt is a real token
        pos = (real.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        # pad queries attend to themselves: a fully masked row would give NaN keys in later layers
        mask = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)
        cache = _SlotCache(self, prefill=(s0, width))
        logits = self._forward(ids, pos, mask[:, None], cache)[:, -1]
        if self._mask is None:
            self._allocate_slots(dev)
        k = len(new)
        self._mask[s0:s0 + k] = False
        self._mask[s0:s0 + k, self._t - width:self._t] = real
        self._pos[s0:s0 + k] = self._tensor([len(r.prompt) for r in new])
        self._procs.join(s0, k)
        for r in new:
            r.start = self._t - len(r.prompt)
        self.rows += new
        self._joining = []
        return self._to_host(new, self._choose(new, logits, s0, longest=0))

    def _allocate_slots(self, dev: Any) -> None:
        import torch

        from prodesc.generate.processors import BatchedAnswerProcessors

        self._mask = torch.zeros(self.slots, self.cache_len, dtype=torch.bool, device=dev)
        self._last = torch.full((self.slots,), self.pad, dtype=torch.long, device=dev)
        self._pos = torch.zeros(self.slots, dtype=torch.long, device=dev)
        self._procs = BatchedAnswerProcessors(self.gen, self.slots, self.cache_len, list(self.stops), self.exempt, dev)

    # ---- one token for every live row -------------------------------------------------------------------------

    def _decode(self) -> _Launched:
        """Launch a decode step for every live row; its tokens are handed out by the next `step`."""
        import torch

        t0 = time.perf_counter()
        if self._t >= self.cache_len:
            self._shift(-min(r.start for r in self.rows))
        n = len(self.rows)
        b = batch_bucket(n, self.slots) if self.graphs else n
        if self._col is None:
            self._col = torch.zeros(1, dtype=torch.long, device=self.model.device)
        self._col.fill_(self._t)
        self._mask[:b, self._t] = True  # every row (padding slots too: no NaN) sees the column it writes
        inputs = (self._last[:b, None], self._pos[:b, None], self._mask[:b, None, None, :])  # padding: any token
        logits = self._replay(b, *inputs) if self.graphs else self._step_forward(b, *inputs)
        self._mask[n:b, self._t] = False
        self._pos[:n] += 1
        self._t += 1
        t0 = self._clock("forward", t0)
        # Every live row has exactly one chosen token not handed out yet (its previous decode step's or its
        # prefill's), which the processors' answers on the device hold already.
        longest = max(len(r.tokens) for r in self.rows) + 1
        launched = self._to_host(list(self.rows), self._choose(self.rows, logits[:n, -1], 0, longest))
        self._clock("choose", t0)
        return launched

    def _land(self, launched: _Launched) -> int:
        """Hand out the tokens of a launched step (waiting for them first); returns how many."""
        t0 = time.perf_counter()
        if launched.ready is not None:
            launched.ready.synchronize()  # releases the GIL while it waits
        tokens = launched.tokens.tolist()
        t0 = self._clock("sync", t0)
        handed = self._emit(launched.rows, tokens)
        self._clock("emit", t0)
        return handed

    def _clock(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now

    def _step_forward(self, b: int, ids: Any, pos: Any, mask: Any) -> Any:
        return self._forward(ids, pos, mask, _SlotCache(self, decode=b))

    def _replay(self, b: int, ids: Any, pos: Any, mask: Any) -> Any:
        """The decode step of bucket `b` as a CUDA graph (captured on first use); eager if capture fails."""
        import torch

        if b not in self._captured:
            try:
                self._captured[b] = self._capture(b, ids, pos, mask)
            except Exception as e:  # noqa: BLE001 - eager decoding still answers, only slower
                log.warning("CUDA graph capture failed (%s: %s): decoding eagerly", type(e).__name__, e)
                self.graphs = False
                torch.cuda.synchronize()
                return self._step_forward(b, ids, pos, mask)
        graph, static_in, out = self._captured[b]
        for buf, x in zip(static_in, (ids, pos, mask), strict=True):
            buf.copy_(x)
        graph.replay()
        return out

    def _capture(self, b: int, ids: Any, pos: Any, mask: Any) -> Any:
        import torch

        static_in = (ids.clone(), pos.clone(), mask.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, cuBLAS handles)
            self._step_forward(b, *static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step_forward(b, *static_in)
        log.info("decode step captured as a CUDA graph for batch bucket %d", b)
        return graph, static_in, out

    def _forward(self, ids: Any, pos: Any, mask: Any, cache: Any) -> Any:
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, logits_to_keep=1,
                          **{self._cache_arg: cache}).logits

    # ---- choosing tokens, each row with its own settings --------------------------------------------------------

    def _choose(self, rows: list[Row], logits: Any, s0: int, longest: int) -> Any:
        """The next token of the rows in slots s0.. (a tensor on the device): the answer-only processors for all
        of them at once, then greedy rows by argmax and sampled rows with their own temperature and top_p.
        `longest`: the longest of their answers so far on the device."""
        import torch

        scores = logits.float()
        if self._procs.active:
            scores = self._procs.apply(s0, scores, longest)
        picked = scores.argmax(-1)
        temps = [r.temperature if r.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0 for r in rows]
        sampled = [i for i, t in enumerate(temps) if t > 0]
        if sampled:
            every = len(sampled) == len(rows)
            idx = None if every else self._tensor(sampled)
            t = self._tensor([temps[i] for i in sampled])[:, None]
            scores = (scores if every else scores[idx]) / t
            top_p = [rows[i].top_p for i in sampled]
            if min(top_p) < 1.0:  # top_p 1 keeps every token: no sort
                scores = _top_p(scores, self._tensor(top_p)[:, None])
            drawn = torch.multinomial(scores.softmax(-1), 1)[:, 0]
            picked = drawn if every else picked.index_copy(0, idx, drawn)
        self._last[s0:s0 + len(rows)] = picked
        if self._procs.active:
            self._procs.record(s0, picked)
        return picked

    def _tensor(self, values: list) -> Any:
        """`values` on the model's device without waiting for the device (through pinned memory on CUDA): a plain
        copy from the host would wait for the step in flight."""
        import torch

        x = torch.tensor(values)
        if self.model.device.type != "cuda":
            return x.to(self.model.device)
        return x.pin_memory().to(self.model.device, non_blocking=True)

    def _to_host(self, rows: list[Row], picked: Any) -> _Launched:
        """Queue the copy of the chosen tokens to the host (pinned, not waited for) behind the step's work."""
        import torch

        if picked.device.type != "cuda":
            return _Launched(rows, picked.cpu())
        tokens = picked.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(rows, tokens, ready)

    def _emit(self, rows: list[Row], tokens: list[int]) -> int:
        """Each live row of `rows` gets its token; the rows that end with it leave. A row that ended after the
        step was launched (before, at its previous token, or cancelled) gets nothing: the token is past its end."""
        live, got = set(self.rows), []
        for r, tok in zip(rows, tokens, strict=True):
            if r not in live:
                continue
            r.tokens.append(tok)
            got.append(r)
            if tok not in self.stops:
                r.on_token(tok)
        stopped = {r for r in got if r.tokens[-1] in self.stops}
        full = {r for r in got if r not in stopped and len(r.tokens) >= r.max_new_tokens}
        self._drop(lambda r: r in stopped, "stop")
        self._drop(lambda r: r in full, "length")
        return len(got)

    # ---- leaving, and keeping the cache compact -----------------------------------------------------------------

    def _drop(self, gone: Callable[[Row], bool], reason: str) -> None:
        """Remove the live rows `gone` says; the last rows move into their slots, so live rows stay in 0..n-1."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if not gone(row):
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self._move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
            row.on_end(reason)

    def _move(self, src: int, dst: int) -> None:
        for keys, values in self._kv:
            keys[dst].copy_(keys[src])
            values[dst].copy_(values[src])
        self._mask[dst] = self._mask[src]
        self._last[dst] = self._last[src]
        self._pos[dst] = self._pos[src]
        self._procs.move(src, dst)

    def _shift(self, by: int) -> None:
        """Move every slot's columns by `by` (negative: left), so the shared column has room."""
        import torch

        n = len(self.rows)
        for keys, values in self._kv:
            for buf in (keys, values):
                buf[:n] = torch.roll(buf[:n], by, dims=2)
        self._mask[:n] = torch.roll(self._mask[:n], by, dims=1)
        self._t += by
        for r in self.rows:
            r.start += by


class _SlotCache:
    """What the model's attention layers see as their cache (`update(keys, values, layer)`): a prefill writes
    the newcomers' prompts into their slots left of the shared column and attends to the prompt alone; a decode
    step writes column `t` of the first `decode` slots and attends to those slots' whole rows (masked)."""

    is_compileable = False

    def __init__(self, engine: Engine, prefill: tuple[int, int] | None = None, decode: int = 0) -> None:
        self.engine, self.prefill, self.decode = engine, prefill, decode
        self.layers: list[Any] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.engine._t

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        e = self.engine
        if layer_idx == len(e._kv):
            e._kv.append(_allocate(key, e.slots, e.cache_len))
        keys, values = e._kv[layer_idx]
        if self.prefill is not None:
            s0, width = self.prefill
            keys[s0:s0 + key.shape[0], :, e._t - width:e._t] = key
            values[s0:s0 + key.shape[0], :, e._t - width:e._t] = value
            return key, value
        # index_copy_ at a device tensor, not [..., t]: a CUDA graph replays with the column of the step
        keys[:self.decode].index_copy_(2, e._col, key)
        values[:self.decode].index_copy_(2, e._col, value)
        return keys[:self.decode], values[:self.decode]


def _allocate(key: Any, slots: int, cache_len: int) -> tuple[Any, Any]:
    import torch

    shape = (slots, key.shape[1], cache_len, key.shape[3])
    return (torch.zeros(shape, dtype=key.dtype, device=key.device),
            torch.zeros(shape, dtype=key.dtype, device=key.device))


def _top_p(scores: Any, top_p: Any) -> Any:
    """transformers' TopPLogitsWarper with one top_p per row ([rows, 1]); keeps at least one token."""
    import torch

    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    remove = cumulative <= (1 - top_p)
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
