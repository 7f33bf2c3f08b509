"""Continuous batching: requests join and leave a running batch token by token (what `prodesc serve` runs on).

    engine = generator.engine(slots=32, cache_len=1536)
    engine.warm_up()           # on CUDA: every decode step captured as a CUDA graph now, not under traffic
    engine.add(Row(prompt_ids, max_new_tokens=64, temperature=0.0, top_p=1.0, on_token=..., on_end=...))
    while engine.busy:
        engine.step()          # rows waiting join (one prefill), every live row's next token(s) are launched, and
                               # the tokens of the previous step (and of the prefill) are handed out

Each row owns a slot of a KV cache shaped [slots, kv_heads, cache_len + slack, head_dim] per layer, its prompt
from column 0 and its answer after it: column = position. A decode step feeds every row the `w` tokens it has not
fed yet (w = 1, or 1 + `generate.speculate_tokens` in a verify step: its last token and the drafts of
generate/speculate.py), writes their keys/values at the row's own next columns and attends to the row's columns
up to each token (a 4D mask built on the device from each row's next column). The step's shapes depend only on
the batch bucket and w, so on CUDA each (bucket, w) is captured once as a CUDA graph (`warm_up`, in
`capture_error_mode="thread_local"` so other threads' CUDA work cannot break a capture; the forward compiled
first with `compile=True`) and a step costs one graph replay however rows come and go. Live rows sit in slots
0..n-1 (a row that leaves is replaced by the last one), and a step runs the first `batch_bucket(n)` slots. Each
row decodes with its own temperature and top_p (greedy at 0) and stops at a stop id, at its `max_new_tokens`, or
as soon as `wanted()` says nobody waits for it any more (within one token).

Everything a step needs is on the device: each slot's tokens (for the lookup), next column, drafts, the answer
processors' state; the host only decides the step's width and hands the chosen tokens out. One decode step is
always in flight: `step` launches decode step k+1 (its inputs, the tokens step k chose, are on the device already)
before it waits for step k's tokens and hands them out, so on CUDA the host's work between steps (handing tokens
out, dropping and admitting rows, launching) runs while the device computes instead of leaving it idle.
Newcomers' first tokens (their prefill's) are still handed out in the step that admits them: their copy to the
host is queued ahead of step k+1. The price: a row that ends (stop id, max_new_tokens, or found unwanted at the
start of a step) has had a step run past its end, which nobody sees, and its slot is reused one step later.
Tokens go to rows by the list of rows their step was launched for, never by slot, so slot moves after a launch
cannot misroute them; on the device every slot move and prefill comes after the step in flight (one CUDA
stream), so they act on its results. Host-device copies on the way (prompts, sampling settings, the chosen
tokens) go through pinned memory without waiting: a synchronous copy would wait for the step in flight.

Speculation (`generate.speculate_tokens` > 0) verifies drafts only where they pay: a verify step costs more
than a one-token step (measured per bucket at warm-up), so the engine runs one while the accepted drafts per
row and verify step (a moving average) cover that extra cost, and otherwise a one-token step with a verify step
now and then (every 8th, backing off to every 256th while they keep failing) to notice when copying starts.
A row's tokens of one verify step are handed out one by one as if decoded one at a time: it stops at the first
stop id or at its max_new_tokens, and stops taking them once `wanted()` turns False.

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
from prodesc.generate.graphs import StepGraphs
from prodesc.generate.speculate import accept, propose

log = logging.getLogger(__name__)
PREFILL_ROWS = 64  # newcomers prefilled in one forward at most: a bigger prefill would stall the live rows' tokens
# Model-thread time of a step by phase (`Engine.seconds`): on CUDA, prefill, forward and choose only launch work,
# and sync waits for the tokens of the step launched one call earlier (and of the prefill), i.e. for the part of the
# device's work that the host's work did not cover; on CPU everything is host time and sync is ~0.
PHASES = ("prefill", "forward", "choose", "sync", "emit")
# Speculation policy (module docstring): a verify step's cost over a one-token step's when not measured (CPU
# timings are taken as steps run; on CUDA `warm_up` times the graphs), the moving average's weight of the latest
# verify step, and the spacing of probing verify steps while drafts do not pay.
VERIFY_COST = 1.2
GAIN_WEIGHT = 0.5
PROBE_EVERY = (8, 256)


@dataclass(eq=False)
class Row:
    """One answer being generated. `on_token(id)` after each new token, then `on_end(reason)` once: "stop" (EOS,
    not passed to on_token), "length" (max_new_tokens), or "cancelled" (`wanted()` turned False). `drafted` and
    `accepted` count its speculated tokens (drafts verified, drafts kept)."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    on_token: Callable[[int], None] = lambda _: None
    on_end: Callable[[str], None] = lambda _: None
    wanted: Callable[[], bool] = lambda: True
    tokens: list[int] = field(default_factory=list)
    deadline: float = math.inf  # for the server's stuck check
    job: Any = None  # the server's request this row answers
    queued_at: float = 0.0  # when `Engine.add` queued it (Engine.clock)
    drafted: int = 0
    accepted: int = 0


@dataclass
class _Launched:
    """A step on the device: the rows it chose tokens for (in slot order at launch) and, per row, the tokens it
    chose, how many of them it keeps and how many drafts it verified ([rows, w + 2]), which are on the host once
    `ready` (a CUDA event; None when the copy was synchronous) has fired."""

    rows: list[Row]
    table: Any
    ready: Any = None


class Engine:
    """The running batch of one model. Single-threaded: call `add` and `step` from the model thread only (or
    `warm_up` before any of them, from any thread)."""

    def __init__(self, model: Any, tok: Any, gen: GenerateConfig, slots: int, cache_len: int,
                 graphs: bool = False, stop_ids: list[int] | None = None, admit_wait_s: float = 0.0,
                 compile: bool = False, speculate: str = "auto") -> None:
        self.model, self.gen, self.slots, self.cache_len = model, gen, slots, cache_len
        self.admit_wait_s = admit_wait_s  # with rows live, how long waiting rows may be held to gather a prefill
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        self.stops = set(stop_ids or [self.eos])  # any of them ends a row (models.stop_ids)
        self.exempt = sorted({i for i in [*tok.all_special_ids, *self.stops] if i is not None})
        self.k = gen.speculate_tokens  # drafts per row and verify step at most (0: no speculation)
        self.speculate = speculate  # "auto": where drafts pay (module docstring); "always": every step (tests)
        # columns per slot: cache_len, the step past a row's end and its drafts, and a last one that the prefill's
        # padding is written to and nothing reads
        self.width = cache_len + 2 * (self.k + 1) + 1
        self.rows: list[Row] = []  # live rows, row i in slot i
        self.waiting: deque[Row] = deque()
        # CUDA graphs per (batch bucket, step width), the forward compiled first with `compile` (graphs.py)
        self._graphs = StepGraphs(self._step_forward, compile) if graphs else None
        self._kv: list[tuple[Any, Any]] = []  # per layer (keys, values), allocated by the first prefill
        # On the model's device, per slot, so a decode step needs no per-row copy from the host: the tokens to feed
        # next (the last chosen token, then the drafts), how many drafts, the column the first of them goes to
        # (= its position), each slot's tokens by column (what drafts are looked up in), how many more tokens the
        # row may take, whether it is greedy, and the answer-only processors' state (generate/processors.py)
        self._feed: Any = None
        self._drafts: Any = None
        self._col: Any = None
        self._seq: Any = None
        self._room: Any = None
        self._greedy: Any = None
        self._procs: Any = None
        self.seconds = dict.fromkeys(PHASES, 0.0)  # summed per phase (/metrics, bench/engine_overhead.py)
        # Prefills so far and the rows they admitted (/metrics): on a GPU each prefill is one eager forward that
        # stalls every live row whatever its size, so many small ones under a burst cost tokens/s.
        self.prefills, self.prefill_rows = 0, 0
        # Speculation so far (/metrics, generate's closing line): verify steps, the rows they decoded, drafts
        # verified and drafts kept
        self.verify_steps, self.verify_rows, self.drafted, self.accepted = 0, 0, 0, 0
        self._gain = 1.0  # moving average of drafts kept per row and verify step (optimistic until measured)
        self._cost: dict[tuple[int, int], float] = {}  # seconds a step of (bucket, width) takes, where measured
        self._probe, self._since = PROBE_EVERY[0], 0
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
    def graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (off for good once a capture failed)."""
        return self._graphs is not None and self._graphs.on

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

    def warm_up(self) -> str:
        """Allocate the cache and, with graphs, compile (`compile`) and capture the decode step of every batch
        bucket and step width now, timing each: a server calls this before it takes traffic, so no request waits
        for a capture and no other work can break one. Idle engines only. Returns what it did, in words."""
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            if not self._kv:
                one = self._tensor([[0]])
                self._forward(one + self.pad, one, (one == 0)[:, None, None], _SlotCache(self, prefill=(0, one)), 1)
                self._allocate_slots(self.model.device)
            if not self.graphs:
                return f"cache allocated, decoding eagerly (no CUDA graphs) in {time.perf_counter() - t0:.1f} s"
            keys = [(b, w) for b in sorted({batch_bucket(n, self.slots) for n in range(1, self.slots + 1)})
                    for w in ([1, self.k + 1] if self.k else [1])]
            while self.graphs and (missing := [key for key in keys if key not in self._graphs.captured]):
                self._graphs.capture(*missing[0])  # (a failed compile drops the graphs captured so far: all again)
            if not self.graphs:
                return f"CUDA graph capture failed, decoding eagerly (after {time.perf_counter() - t0:.1f} s)"
            self._cost.update(self._graphs.timings())
            return (f"{len(self._graphs.captured)} decode steps captured as CUDA graphs ("
                    f"{'one-token steps compiled' if self._graphs.compile else 'eager forward'}) in "
                    f"{time.perf_counter() - t0:.1f} s")

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
        """One forward over the newcomers' left-padded prompts; each prompt's keys/values go to columns 0.. of its
        slot (padding to the slot's last column), and its first token is chosen."""
        import torch

        width, k, s0, dev = max(len(r.prompt) for r in new), len(new), len(self.rows), self.model.device
        ids = self._tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in new])
        lens = self._tensor([len(r.prompt) for r in new])
        real = torch.arange(width, device=dev)[None, :] >= (width - lens)[:, None]  # a pad id in a prompt is real
        pos = (real.long().cumsum(1) - 1).clamp(min=0)
        cols = torch.where(real, pos, self.width - 1)
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        # pad queries attend to themselves: a fully masked row would give NaN keys in later layers
        mask = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)
        logits = self._forward(ids, pos, mask[:, None], _SlotCache(self, prefill=(s0, cols)), keep=1)
        if self._seq is None:
            self._allocate_slots(dev)
        sl = slice(s0, s0 + k)
        self._seq[sl].scatter_(1, cols, ids)
        self._col[sl] = lens
        self._room[sl] = self._tensor([r.max_new_tokens for r in new])
        self._greedy[sl] = self._tensor([r.temperature < MIN_SAMPLING_TEMPERATURE for r in new])
        self._procs.join(s0, k)
        self.rows += new
        self._joining = []
        picked = self._choose(new, logits, s0, longest=0)
        one = torch.ones(k, dtype=torch.long, device=dev)
        self._advance(s0, picked, one, moved=False)
        return self._to_host(new, torch.cat([picked, one[:, None], 0 * one[:, None]], 1))

    def _allocate_slots(self, dev: Any) -> None:
        import torch

        from prodesc.generate.processors import BatchedAnswerProcessors

        n, w = self.slots, self.k + 1
        self._feed = torch.full((n, w), self.pad, dtype=torch.long, device=dev)
        self._drafts = torch.zeros(n, dtype=torch.long, device=dev)
        self._col = torch.zeros(n, dtype=torch.long, device=dev)
        self._seq = torch.full((n, self.width), self.pad, dtype=torch.long, device=dev)
        self._room = torch.zeros(n, dtype=torch.long, device=dev)
        self._greedy = torch.zeros(n, dtype=torch.bool, device=dev)
        self._steps = torch.arange(w, device=dev)
        self._columns = torch.arange(self.width, device=dev)
        self._procs = BatchedAnswerProcessors(self.gen, n, self.cache_len + 2 * w, list(self.stops), self.exempt,
                                              dev)

    # ---- the next token(s) of every live row --------------------------------------------------------------------

    def _decode(self) -> _Launched:
        """Launch a decode step for every live row; its tokens are handed out by the next `step`."""
        t0 = time.perf_counter()
        n = len(self.rows)
        w = self.k + 1 if self._verifying(n) else 1
        b = batch_bucket(n, self.slots) if self.graphs else n
        if w > 1:
            self._draft(n)
        logits = self._graphs.replay(b, w) if self.graphs else None
        logits = self._timed_forward(b, w) if logits is None else logits
        t0 = self._clock("forward", t0)
        # Every live row has at most k + 1 chosen tokens not handed out yet (its previous step's or its prefill's),
        # which the processors' answers on the device hold already; the drafts come after them.
        longest = max(len(r.tokens) for r in self.rows) + self.k + 1
        fed = self._feed[:n, :w]
        self._seq[:n].scatter_(1, self._col[:n, None] + self._steps[:w], fed)
        picked = self._choose(self.rows, logits[:n], 0, longest)
        drafted = self._drafts[:n] if w > 1 else self._drafts[:n] * 0
        kept = accept(picked, fed, drafted)
        table = self._tensor_cat(picked, kept, drafted)
        self._advance(0, picked, kept, moved=True)
        launched = self._to_host(list(self.rows), table)
        self._clock("choose", t0)
        return launched

    def _verifying(self, n: int) -> bool:
        """Whether this step verifies drafts: some row is greedy, and drafts pay here or it is time to probe."""
        if not self.k or all(r.temperature >= MIN_SAMPLING_TEMPERATURE for r in self.rows):
            return False
        if self.speculate == "always":
            return True
        b = batch_bucket(n, self.slots) if self.graphs else n
        plain, verify = self._cost.get((b, 1)), self._cost.get((b, self.k + 1))
        cost = verify / plain if plain and verify else VERIFY_COST
        if 1 + self._gain >= cost:
            self._probe, self._since = PROBE_EVERY[0], 0
            return True
        self._since += 1
        if self._since < self._probe:
            return False
        self._probe, self._since = min(2 * self._probe, PROBE_EVERY[1]), 0
        return True

    def _advance(self, s0: int, picked: Any, kept: Any, moved: bool) -> None:
        """After a step chose `picked` [n, w] and rows keep `kept` [n] of them: the answers, columns and room move
        on (`moved`: the fed tokens are in the cache now; a prefill's first token is not), and the last kept token
        is fed next."""
        n = picked.shape[0]
        sl = slice(s0, s0 + n)
        if self._procs.active:
            self._procs.record(s0, picked, kept)
        last = picked.gather(1, (kept - 1)[:, None])
        if moved:
            self._col[sl] += kept
        self._room[sl] -= kept
        self._seq[sl].scatter_(1, self._col[sl, None], last)
        self._feed[sl, :1] = last

    def _draft(self, n: int) -> None:
        """Look up the drafts of the first n slots, fed after their last tokens (only before a verify step)."""
        allowed = (self._room[:n] - 1).clamp(min=0) * self._greedy[:n]  # a step keeps drafts + 1 tokens at most
        drafts, count = propose(self._seq[:n], self._col[:n], allowed, self.k)
        self._feed[:n, 1:] = drafts
        self._drafts[:n] = count

    def _land(self, launched: _Launched) -> int:
        """Hand out the tokens of a launched step (waiting for them first); returns how many."""
        t0 = time.perf_counter()
        if launched.ready is not None:
            launched.ready.synchronize()  # releases the GIL while it waits
        table = launched.table.tolist()
        t0 = self._clock("sync", t0)
        handed = self._emit(launched.rows, table)
        self._clock("emit", t0)
        return handed

    def _clock(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now

    # ---- the decode step's forward (eager here; graphs.py replays it as CUDA graphs) ----------------------------

    def _step_forward(self, b: int, w: int) -> Any:
        """The forward of a decode step of the first `b` slots, `w` tokens each: logits [b, w, vocab]."""
        at = self._col[:b, None] + self._steps[:w]  # each fed token's column, which is its position
        mask = (self._columns[None, None, :] <= at[:, :, None])[:, None]  # [b, 1, w, width]
        return self._forward(self._feed[:b, :w], at, mask, _SlotCache(self, decode=(b, at)), keep=0)

    def _timed_forward(self, b: int, w: int) -> Any:
        """Eager step; on CPU (synchronous) its time feeds the speculation policy's cost of each width."""
        t0 = time.perf_counter()
        logits = self._step_forward(b, w)
        if self.model.device.type != "cuda":
            dt, old = time.perf_counter() - t0, self._cost.get((b, w))
            self._cost[(b, w)] = dt if old is None else 0.8 * old + 0.2 * dt
        return logits

    def _forward(self, ids: Any, pos: Any, mask: Any, cache: Any, keep: int) -> Any:
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, logits_to_keep=keep,
                          **{self._cache_arg: cache}).logits

    # ---- choosing tokens, each row with its own settings --------------------------------------------------------

    def _choose(self, rows: list[Row], logits: Any, s0: int, longest: int) -> Any:
        """The tokens of the rows in slots s0.. for each position of `logits` [n, w, vocab] (a tensor [n, w] on the
        device): the answer-only processors for all of them at once (position j after the row's first j drafts),
        then greedy rows by argmax and sampled rows (which draft nothing: position 0 only) with their own
        temperature and top_p. `longest`: an upper bound of their answers so far on the device."""
        import torch

        scores = logits.float()
        if self._procs.active:
            if scores.shape[1] == 1:
                scores[:, 0] = self._procs.apply(s0, scores[:, 0], longest)
            else:
                scores = self._procs.apply_verify(s0, scores, self._feed[s0:s0 + len(rows), 1:scores.shape[1]],
                                                  longest)
        picked = scores.argmax(-1)
        temps = [r.temperature if r.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0 for r in rows]
        sampled = [i for i, t in enumerate(temps) if t > 0]
        if sampled:
            idx = self._tensor(sampled)
            t = self._tensor([temps[i] for i in sampled])[:, None]
            first = scores[idx, 0] / t
            top_p = [rows[i].top_p for i in sampled]
            if min(top_p) < 1.0:  # top_p 1 keeps every token: no sort
                first = _top_p(first, self._tensor(top_p)[:, None])
            drawn = torch.multinomial(first.softmax(-1), 1)[:, 0]
            picked[:, 0] = picked[:, 0].index_copy(0, idx, drawn)
        return picked

    def _tensor(self, values: list) -> Any:
        """`values` on the model's device without waiting for the device (through pinned memory on CUDA): a plain
        copy from the host would wait for the step in flight."""
        import torch

        x = torch.tensor(values)
        if self.model.device.type != "cuda":
            return x.to(self.model.device)
        return x.pin_memory().to(self.model.device, non_blocking=True)

    @staticmethod
    def _tensor_cat(picked: Any, kept: Any, drafted: Any) -> Any:
        import torch

        return torch.cat([picked, kept[:, None], drafted[:, None]], 1)

    def _to_host(self, rows: list[Row], table: Any) -> _Launched:
        """Queue the copy of the step's table to the host (pinned, not waited for) behind the step's work."""
        import torch

        if table.device.type != "cuda":
            return _Launched(rows, table.cpu())
        host = table.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(rows, host, ready)

    def _emit(self, rows: list[Row], table: list[list[int]]) -> int:
        """Each live row of `rows` gets the tokens it keeps, one at a time as if decoded so: up to its first stop
        id or its max_new_tokens, and none once it is not wanted; the rows that end leave. A row that ended after
        the step was launched (before, at its previous token, or cancelled) gets nothing: the tokens are past its
        end."""
        live, handed, ended = set(self.rows), 0, {}
        for r, line in zip(rows, table, strict=True):
            if r not in live:
                continue
            w = len(line) - 2
            kept, drafted = line[w], line[w + 1]
            if w > 1:
                self.verify_rows += 1
                if drafted:
                    r.drafted, r.accepted = r.drafted + drafted, r.accepted + kept - 1
                    self.drafted, self.accepted = self.drafted + drafted, self.accepted + kept - 1
            for i, tok in enumerate(line[:kept]):
                if i and not r.wanted():  # the next step would have dropped it before this token
                    break
                r.tokens.append(tok)
                handed += 1
                if tok in self.stops:
                    ended[r] = "stop"
                    break
                r.on_token(tok)
                if len(r.tokens) >= r.max_new_tokens:
                    ended[r] = "length"
                    break
        if rows and len(table[0]) > 3:
            self._learn(rows, table, live)
        self._drop(lambda r: ended.get(r) == "stop", "stop")
        self._drop(lambda r: ended.get(r) == "length", "length")
        return handed

    def _learn(self, rows: list[Row], table: list[list[int]], live: set[Row]) -> None:
        """A verify step's drafts kept per live row, into the moving average the policy reads."""
        got = [line[-2] - 1 for r, line in zip(rows, table, strict=True)
               if r in live and r.temperature < MIN_SAMPLING_TEMPERATURE]
        if got:
            self.verify_steps += 1
            self._gain = (1 - GAIN_WEIGHT) * self._gain + GAIN_WEIGHT * sum(got) / len(got)

    # ---- leaving ----------------------------------------------------------------------------------------------

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
        for buf in (self._feed, self._drafts, self._col, self._seq, self._room, self._greedy):
            buf[dst] = buf[src]
        self._procs.move(src, dst)


class _SlotCache:
    """What the model's attention layers see as their cache (`update(keys, values, layer)`): a prefill writes the
    newcomers' prompts into their slots at the columns `cols` [rows, width] and attends to the prompt alone; a
    decode step writes the fed tokens of the first `b` slots at their columns `at` [b, w] and attends to those
    slots' whole rows (masked)."""

    is_compileable = False

    def __init__(self, engine: Engine, prefill: tuple[int, Any] | None = None,
                 decode: tuple[int, Any] | None = None) -> None:
        self.engine, self.prefill, self.decode = engine, prefill, decode
        self.layers: list[Any] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given; columns are per row

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        e = self.engine
        if layer_idx == len(e._kv):
            e._kv.append(_allocate(key, e.slots, e.width))
        keys, values = e._kv[layer_idx]
        s0, cols = self.prefill if self.prefill is not None else (0, self.decode[1])
        n, heads, w, dim = key.shape
        # scatter_ at device indices, not [..., c]: a CUDA graph replays with the columns of the step
        at = cols[:, None, :, None].expand(n, heads, w, dim)
        keys[s0:s0 + n].scatter_(2, at, key)
        values[s0:s0 + n].scatter_(2, at, value)
        if self.prefill is not None:
            return key, value
        return keys[:n], values[:n]


def _allocate(key: Any, slots: int, width: int) -> tuple[Any, Any]:
    import torch

    shape = (slots, key.shape[1], width, key.shape[3])
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
