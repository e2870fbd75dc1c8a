"""The decode engine: a fixed number of slots that decode together, one token per step for all of them.

Requests join between steps (continuous batching): each step first prefills the waiting requests that fit into free
slots (one forward for all of them), then runs one decode step over the live slots. On CUDA the decode step is a CUDA
graph, captured when the model loads for every (batch, keys) bucket: the first `batch` slots (a power of two covering
the highest live slot; free slots among them compute a token nobody reads) attending over the first `keys` cache
positions (a power of two covering the longest live row). Replaying the smallest fitting graph removes the per-token
kernel launches that bound eager decoding, and a lone request neither computes 31 idle rows nor reads a whole
cache sized for the longest request the server accepts.

Each slot owns a row of a static KV cache written at its own position, its own 4D attention mask row and position
ids, so rows of different lengths and ages share one forward without touching the model's code. Per-row decoding
(greedy or sampling, repetition penalty, limits, EOS, stop strings, streaming) is done for all rows with one
device->host copy per step. A row may use one of several LoRA adapters (see multi_lora): the engine only sets the
route (which adapter each row uses) before each forward.

No Ray and no HTTP here: `serve` feeds the engine from its request handlers (`submit`, thread-safe) and runs it on
one model thread (`serve_forever`); `complete` runs a list of requests to the end in the calling thread.
"""

from __future__ import annotations

import functools
import logging
import queue
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ray_sft import generate
from ray_sft.generate import Completion
from ray_sft.spec import GenerationSpec

log = logging.getLogger("ray.serve")


CANCELLED = "cancelled"  # the finish reason of a request cancelled before its end


class UnknownAdapter(LookupError):
    """The request's adapter is not (or no longer) served."""


@dataclass(eq=False)
class Request:
    ids: list[int]  # the rendered prompt's token ids
    settings: GenerationSpec  # settings.max_new_tokens is this request's limit
    stops: list[str] = field(default_factory=list)
    adapter: str | None = None  # a served name (see Engine.load); None: the model as loaded
    on_delta: Callable[[str], None] | None = None  # streamed text, called from the engine's thread
    on_done: Callable[[Completion | BaseException], None] | None = None  # once, whatever ends the request
    cancelled: bool = False  # set from any thread: the slot is freed at the next step

    def cancel(self) -> None:
        self.cancelled = True


class SlotCache:
    """A static KV cache of `slots` rows, each written at its own position.

    Duck-typed for transformers' decoder layers, which only call `update` when given a 4D mask and position ids.
    `rows` (None: the first slots, as many as the forward has rows) and `starts` say where the next forward's keys
    go; `limit` (None: the whole cache) is how many positions the forward attends over.
    """

    is_compileable = True

    def __init__(self, config, slots: int, length: int, dtype, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, config.num_key_value_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots, self.length = slots, length
        self.rows: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None
        self.limit: int | None = None

    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        at = self.starts[:, None] + torch.arange(key.shape[2], device=key.device)
        rows = (torch.arange(key.shape[0], device=key.device) if self.rows is None else self.rows)[:, None]
        keys[rows.expand_as(at), :, at] = key.transpose(1, 2)
        values[rows.expand_as(at), :, at] = value.transpose(1, 2)
        if self.rows is None:  # the first slots: views, no copy of the cache
            keys, values = keys[:key.shape[0]], values[:key.shape[0]]
        else:
            keys, values = keys[self.rows], values[self.rows]
        if self.limit is not None:
            keys, values = keys[:, :, :self.limit], values[:, :, :self.limit]
        return keys, values

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0  # positions come from position_ids, never from the cache


class _Text:
    """Incremental detokenization (as vLLM does it): each new token decodes only a short window of recent ids,
    and text is released only once it no longer ends in a partial character."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids = tokenizer, ids
        self.text, self.prefix, self.read = "", 0, 0

    def advance(self) -> None:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, after = decode(self.ids[self.prefix:self.read]), decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)


@dataclass(eq=False)
class _Row:
    request: Request
    ids: list[int] = field(default_factory=list)
    text: _Text | None = None  # only rows that stream or have stop strings follow their text
    checked: int = 0  # text before this offset holds no stop string
    sent: int = 0  # characters streamed so far


class Engine:
    def __init__(self, tokenizer, slots: int, length: int, static: bool | None = None):
        """`slots` requests decode together, each up to `length` positions (prompt + new tokens). `static`: decode
        with the bucketed static-shape steps (None: on CUDA with a dense model, captured as CUDA graphs; True on
        CPU runs the same steps uncaptured, e.g. to check them against the eager path)."""
        self.tokenizer, self.slots, self.length, self.static = tokenizer, slots, length, static
        self.batch_sizes, self.key_lengths = powers_of_two(slots, 1), powers_of_two(length, 64)
        self.eos = tokenizer.eos_token_id
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Request] = deque()
        self.rows: list[_Row | None] = [None] * slots
        self.model = self.cache = self.steps = self.route = None
        self.adapters: dict[str | None, int] = {}

    # -- the model and its adapters (between steps only) ------------------------------------------------------

    def load(self, model, adapters: dict[str | None, int], route=None) -> None:
        """Decode with `model` from the next step on. `adapters` maps served names to route indices (0: no
        adapter); `route` (multi_lora.Route) is set to each forward's per-row indices. Running rows keep their
        adapter by name; a row whose adapter is gone fails."""
        self.model, self.adapters, self.route = model, adapters, route
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        device, dtype = model.device, next(p for p in model.parameters() if p.is_floating_point()).dtype
        if self.cache is None or self.cache.keys[0].device != device or self.cache.keys[0].dtype != dtype:
            self._allocate(model.config, dtype, device)
        for slot, row in enumerate(self.rows):
            if row is not None and row.request.adapter not in adapters:
                self._end(slot, UnknownAdapter(row.request.adapter))
            elif row is not None:
                self.slot_adapter[slot] = adapters[row.request.adapter]
        self.steps = None
        # CUDA graphs need every kernel to be capturable; bitsandbytes' 4-bit kernels are not.
        static = self.static if self.static is not None else (
            device.type == "cuda" and not getattr(model, "is_quantized", False))
        if static:
            buckets = [(b, k) for b in self.batch_sizes for k in self.key_lengths]
            try:
                self.steps = _capture(self._static_logits, buckets, device)
            except Exception:  # a kernel that cannot be captured: correct but slower, and said so
                log.warning("CUDA graph capture of the decode step failed; decoding eagerly", exc_info=True)
                torch.cuda.synchronize()

    def _allocate(self, config, dtype, device) -> None:
        self.cache = SlotCache(config, self.slots, self.length, dtype, device)
        zeros = lambda dtype: torch.zeros(self.slots, dtype=dtype, device=device)  # noqa: E731
        self.tokens, self.positions, self.slot_adapter = zeros(torch.long), zeros(torch.long), zeros(torch.long)
        # Slots never used still take part in sampling's arithmetic: neutral values keep their rows finite.
        self.penalty, self.temperature, self.top_p = (zeros(torch.float) + 1 for _ in range(3))
        self.sampling = zeros(torch.bool)
        self.seen = torch.zeros(self.slots, config.vocab_size, dtype=torch.bool, device=device)
        self.key_index = torch.arange(self.length, device=device)
        self.slot_index = torch.arange(self.slots, device=device)
        self.min = torch.finfo(dtype).min

    # -- feeding it --------------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (any thread); it joins at the next step with a free slot."""
        needed = len(request.ids) + request.settings.max_new_tokens - 1
        if not request.ids or needed > self.length:
            raise ValueError(f"a request of {len(request.ids)} prompt + {request.settings.max_new_tokens} new "
                             f"tokens does not fit the cache ({self.length}); empty prompts are refused")
        self.inbox.put(request)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine's thread between two steps (loading adapters, swapping the model)."""
        future: Future = Future()
        self.inbox.put((fn, future))
        return future

    def serve_forever(self) -> None:
        """The engine's thread: steps while there is work, sleeps on the inbox while there is none."""
        while True:
            self._take(self.inbox.get())
            while self.busy():
                self.step()

    def busy(self) -> bool:
        return not self.inbox.empty() or bool(self.waiting) or any(row is not None for row in self.rows)

    def complete(self, requests: list[Request]) -> list[Completion]:
        """Run `requests` to their end in this thread (tests, benchmarks); results in order."""
        results: dict[int, Completion] = {}
        for index, request in enumerate(requests):
            request.on_done = lambda result, index=index: results.__setitem__(index, result)
            self.submit(request)
        while len(results) < len(requests):
            self.step()
        errors = [r for r in results.values() if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return [results[i] for i in range(len(requests))]

    def _take(self, item) -> None:
        if isinstance(item, Request):
            self.waiting.append(item)
            return
        fn, future = item
        try:
            future.set_result(fn())
        except BaseException as error:  # the caller's future carries it; the engine goes on
            future.set_exception(error)

    # -- one step ----------------------------------------------------------------------------------------------

    def step(self) -> None:
        """Admit what fits, then decode one token for every slot."""
        while True:
            try:
                self._take(self.inbox.get_nowait())
            except queue.Empty:
                break
        for slot, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self.rows[slot] = None
                self._finish(row.request, _cancelled(row.request, row.ids))
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._finish(request, _cancelled(request, []))
        try:
            with torch.inference_mode():
                self._admit()
                if any(row is not None for row in self.rows):
                    self._decode()
        except Exception as error:  # e.g. out of memory: the rows in flight fail, the engine keeps serving
            log.exception("decode step failed")
            for slot, row in enumerate(self.rows):
                if row is not None:
                    self._end(slot, error)

    def _admit(self) -> None:
        free = [slot for slot, row in enumerate(self.rows) if row is None]
        admitted: list[tuple[int, Request]] = []
        while free and self.waiting:
            request = self.waiting.popleft()
            if request.adapter not in self.adapters:
                self._finish(request, UnknownAdapter(request.adapter))
                continue
            admitted.append((free.pop(0), request))
        if admitted:
            self._prefill(admitted)

    def _prefill(self, admitted: list[tuple[int, Request]]) -> None:
        """One forward for all admitted prompts, right-padded with each row's last token (a token it has seen, so
        the padding neither changes its repetition penalty nor is attended to by its real positions)."""
        device = self.seen.device
        slots = torch.tensor([slot for slot, _ in admitted], device=device)
        lengths = torch.tensor([len(r.ids) for _, r in admitted], device=device)
        width = max(len(r.ids) for _, r in admitted)
        ids = torch.tensor([r.ids + r.ids[-1:] * (width - len(r.ids)) for _, r in admitted], device=device)
        for slot, request in admitted:
            self._configure(slot, request)
        self.seen[slots] = False
        self.seen[slots[:, None].expand_as(ids), ids] = True
        causal = self.key_index[None, :width] <= torch.arange(width, device=device)[:, None]
        mask = self._additive(causal)[None, None].expand(len(admitted), 1, width, width)
        positions = torch.arange(width, device=device)[None].expand(len(admitted), width)
        hidden = self._forward(ids, mask, positions, slots, torch.zeros_like(slots), self.slot_adapter[slots], width)
        last = hidden[torch.arange(len(admitted), device=device), lengths - 1]
        chosen = self._choose(self.head(last).float(), slots)
        self.positions[slots] = lengths
        self._accept(slots, chosen, [slot for slot, _ in admitted])

    def _configure(self, slot: int, request: Request) -> None:
        s = request.settings
        self.rows[slot] = row = _Row(request)
        if request.stops or request.on_delta:
            row.text = _Text(self.tokenizer, row.ids)
        self.slot_adapter[slot] = self.adapters[request.adapter]
        self.penalty[slot], self.sampling[slot] = s.repetition_penalty, s.do_sample
        self.temperature[slot], self.top_p[slot] = s.temperature, s.top_p

    def _decode(self) -> None:
        active = [slot for slot, row in enumerate(self.rows) if row is not None]
        # Keys the longest live row attends over: its prompt and every token so far (the newest is written now).
        keys = max(len(self.rows[s].request.ids) + len(self.rows[s].ids) for s in active)
        if self.steps is not None:
            batch, limit = fitting(self.batch_sizes, active[-1] + 1), fitting(self.key_lengths, keys)
            slots = self.slot_index[:batch]
            chosen = self._choose(self.steps[batch, limit](), slots)
            # Free slots among the first `batch` advance too: the clamp keeps their (unread) writes inside the
            # cache. A live row never reaches the end (submit checks its length).
            self.positions[:batch].add_(1).clamp_(max=self.length - 1)
            self._accept(slots, chosen, range(batch))
            return
        # Eager (CPU, 4-bit base): only live rows, attending only as far as the longest of them has come.
        slots = torch.tensor(active, device=self.tokens.device)
        chosen = self._choose(self._logits(self.tokens[slots], self.positions[slots], self.slot_adapter[slots],
                                           slots, keys), slots)
        self.positions[slots] += 1
        self._accept(slots, chosen, active)

    def _static_logits(self, batch: int, limit: int) -> torch.Tensor:
        """One token for the first `batch` slots over the first `limit` keys: static shapes, views of the engine's
        buffers, nothing read on the host (what a CUDA graph replays)."""
        return self._logits(self.tokens[:batch], self.positions[:batch], self.slot_adapter[:batch], None, limit)

    def _logits(self, tokens, positions, adapters, slots: torch.Tensor | None, limit: int) -> torch.Tensor:
        keys = self.key_index[:limit]
        mask = self._additive(keys[None, :] <= positions[:, None])[:, None, None, :]
        hidden = self._forward(tokens[:, None], mask, positions[:, None], slots, positions, adapters, limit)
        return self.head(hidden[:, -1]).float()

    def _forward(self, ids, mask, positions, slots, starts, adapters, limit=None) -> torch.Tensor:
        self.cache.rows, self.cache.starts, self.cache.limit = slots, starts, limit
        if self.route is not None:
            self.route.rows = adapters
        # Positional: transformers renamed past_key_values to cache (5.24).
        return self.decoder(ids, mask, positions, self.cache).last_hidden_state

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        # An additive mask works with every attention kernel; a finite minimum keeps a fully masked row finite.
        return torch.zeros(allowed.shape, dtype=self.cache.keys[0].dtype, device=allowed.device).masked_fill(
            ~allowed, self.min)

    def _choose(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Next token per row, as transformers' RepetitionPenaltyLogitsProcessor, temperature and top-p do it."""
        penalty = self.penalty[slots][:, None]
        logits = torch.where(self.seen[slots], torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        greedy = logits.argmax(-1)
        if not any(row.request.settings.do_sample for row in self.rows if row is not None):
            return greedy
        return torch.where(self.sampling[slots], _sample(logits, self.temperature[slots], self.top_p[slots]), greedy)

    def _accept(self, slots: torch.Tensor, chosen: torch.Tensor, order) -> None:
        """Record the chosen tokens on the device, then read them once (`order`: each one's slot) and advance the
        live rows on the host."""
        self.tokens[slots] = chosen
        self.seen[slots, chosen] = True
        for slot, token in zip(order, chosen.tolist()):
            if self.rows[slot] is not None:
                self._advance(slot, token)

    def _advance(self, slot: int, token: int) -> None:
        row = self.rows[slot]
        row.ids.append(token)
        if token == self.eos or len(row.ids) >= row.request.settings.max_new_tokens:
            self._end(slot)
        elif row.text is not None:
            row.text.advance()
            if self._stopped(row):
                self._end(slot)
            elif row.request.on_delta:
                hold = max((len(s) - 1 for s in row.request.stops), default=0)
                self._send(row, len(row.text.text) - hold)

    def _stopped(self, row: _Row) -> bool:
        stops = row.request.stops
        if not stops:
            return False
        longest = max(len(s) for s in stops)
        found = generate.first_stop(row.text.text[row.checked:], stops) is not None
        row.checked = max(0, len(row.text.text) - longest + 1)
        return found

    def _send(self, row: _Row, upto: int) -> None:
        if upto > row.sent:
            row.request.on_delta(row.text.text[row.sent:upto])
            row.sent = upto

    def _end(self, slot: int, error: BaseException | None = None) -> None:
        row, self.rows[slot] = self.rows[slot], None
        request = row.request
        self._finish(request, error or generate.finish(self.tokenizer, row.ids, len(request.ids), request.stops))

    @staticmethod
    def _finish(request: Request, result: Completion | BaseException) -> None:
        if request.on_done is not None:
            request.on_done(result)


def _cancelled(request: Request, ids: list[int]) -> Completion:
    # Nobody reads the text of a request whose client went away; what it cost (tokens decoded) is still reported.
    return Completion("", len(request.ids), len(ids), CANCELLED)


def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper then TopPLogitsWarper, per row, then one draw per row."""
    logits = logits / temperature[:, None]
    ordered, order = logits.sort(dim=-1)
    dropped = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)[:, None]
    dropped[:, -1] = False  # the most likely token always stays
    logits = logits.masked_fill(dropped.scatter(1, order, dropped), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


def powers_of_two(most: int, least: int) -> list[int]:
    """`least`, 2 x `least`, ... below `most`, then `most`: the bucket sizes of one dimension."""
    sizes = []
    while least < most:
        sizes.append(least)
        least *= 2
    return sizes + [most]


def fitting(sizes: list[int], need: int) -> int:
    """The smallest bucket that holds `need`."""
    return next(size for size in sizes if size >= need)


def _capture(step: Callable[[int, int], torch.Tensor], buckets: list[tuple[int, int]], device) -> dict:
    """step(batch, keys) for every bucket, as a callable: a CUDA graph on CUDA (largest first, all sharing one
    memory pool, so the smaller ones reuse the largest one's memory), the plain call elsewhere."""
    if device.type != "cuda":
        return {bucket: functools.partial(step, *bucket) for bucket in buckets}
    pool = torch.cuda.graph_pool_handle()
    return {bucket: _Graph(functools.partial(step, *bucket), pool)
            for bucket in sorted(buckets, key=lambda b: b[0] * b[1], reverse=True)}


class _Graph:
    """`fn` captured once as a CUDA graph; calling replays it. Its inputs are the engine's static buffers (tokens,
    positions, adapters, cache), updated in place between replays."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph: lazy initialisation, autotuning
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool):
            self.output = fn()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output
