"""Continuous batching for the local engine: requests join the running batch at the next step and leave
when done, each row with its own adapter, sampling settings, stop strings and logits processors.

Why: decoding on a CPU is bound by reading the weights, so one forward pass over B rows costs little more
than over one; one model shared by taking turns made the product slower exactly when people used it.

One engine thread owns the model. Each step it does at most one prefill slice (:data:`PREFILL_SLICE`
tokens of one waiting request, so a long prompt never stalls the decoding rows for more than one slice)
and one decode step for every running row together.

- Rows are left-padded to a common length inside one ``DynamicCache``; an attention mask hides the
  padding and each row's positions are its own. A request is prefilled alone (batch of one), then its
  cache is merged into the batch; rows that finish are dropped and all-padding columns trimmed.
- Per-row adapters: each LoRA layer adds every row's own adapter on top of the shared int8 base
  (``serving.generation.lora``); no global "active adapter".
- Context-aware decoding's question-only prompt is one more row of the same request.
- The KV bound (``kv_cache_tokens``) is checked on the padded layout: rows x the longest final length.
  A request that could never fit is refused at once; one that does not fit now waits (``queued_s``).
- Prefix reuse: the KV of the system prompt (``prefix_len`` tokens) is kept per adapter and copied into
  each new request with the same prefix instead of being computed again.
- The int8 layers quantize each row on its own (``serving.generation.int8``), so a row's greedy output
  does not depend on its neighbours.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable

from serving.config import ServingError
from serving.generation.types import GenerationParams, StopStringBuffer, TokenStream

PREFILL_SLICE = 256  # prompt tokens per prefill forward pass: bounds how long one request stalls the batch
BASE_ROW = "__base__"  # the row key of a row without adapter (no adapter is loaded under it)
MIN_PREFIX = 16  # shorter shared prefixes are not worth a cache entry
PREFIX_ENTRIES = 8
_END = object()


class Sequence:
    """One row: a prompt and its KV cache (its own while prefilling, then a row of the batch cache)."""

    def __init__(self, ids: list[int], key: str, prefix_len: int) -> None:
        self.ids = ids
        self.key = key
        self.prefix_len = prefix_len if prefix_len >= MIN_PREFIX else 0
        self.cache: Any = None
        self.done = 0  # prompt tokens in the cache
        self.logits: Any = None  # after the last prefill slice


class Request:
    def __init__(self, ids: list[int], key: str, params: GenerationParams, stream: TokenStream,
                 prefix_len: int, contrast_prefix_len: int) -> None:
        self.params = params
        self.stream = stream
        self.main = Sequence(ids, key, prefix_len)
        self.contrast = (Sequence(list(params.contrast_ids), key, contrast_prefix_len)
                         if params.contrast_ids is not None else None)
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.finished = False
        self.generated: list[int] = []
        self.next_token: int | None = None
        self.stops = StopStringBuffer(tuple(params.stop))
        self.submitted = time.perf_counter()

    @property
    def sequences(self) -> list[Sequence]:
        return [self.main] + ([self.contrast] if self.contrast is not None else [])

    @property
    def final_length(self) -> int:
        return max(len(s.ids) for s in self.sequences) + self.params.max_new_tokens


class Sampler:
    """The per-row logits processing of one request: context-aware mix, repetition penalty on the generated
    tokens only (penalising the prompt pushes a RAG answer away from its sources), temperature / top-p,
    the grounded-decoding constraint, then greedy or seeded sampling. transformers' processors do the work."""

    def __init__(self, params: GenerationParams) -> None:
        import torch
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopPLogitsWarper)

        self.params = params
        self.sampling = params.temperature > 0
        self.warpers = LogitsProcessorList()
        if self.sampling:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
        self.penalty = (RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                        if params.repetition_penalty != 1.0 else None)
        self.rng = torch.Generator().manual_seed(params.seed) if self.sampling else None

    def choose(self, logits, contrast_logits, generated: list[int]) -> int:
        import torch

        scores = logits.float().unsqueeze(0)
        if contrast_logits is not None:
            a = self.params.cad_alpha
            scores = (1.0 + a) * scores - a * contrast_logits.float().unsqueeze(0)
        if self.penalty is not None and generated:
            scores = self.penalty(torch.tensor([generated], device=scores.device), scores)
        if self.warpers:
            scores = self.warpers(None, scores)
        constraint = self.params.constraint
        if constraint is not None:
            scores = constraint(scores)
        if self.sampling:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1).cpu(), 1, generator=self.rng)[0, 0])
        else:
            token = int(scores.argmax(dim=-1)[0])
        if constraint is not None:
            constraint.advance(token)
        return token


class BatchScheduler:
    """The engine thread and its batch. ``forward(ids, cache, adapter_names, mask, positions)`` runs the model
    and returns last-position logits; ``lock`` guards the model (adapter loading takes it too)."""

    def __init__(self, forward: Callable[..., Any], new_cache: Callable[..., Any], decode: Callable[[list[int]], str],
                 eos_ids: set[int], lock: threading.RLock, device: str, max_rows: int, kv_cache_tokens: int,
                 retire: Callable[[set[str]], set[str]]) -> None:
        self._forward = forward
        self._new_cache = new_cache
        self._decode = decode
        self._eos = eos_ids
        self._lock = lock
        self._device = device
        self.max_rows = max_rows
        self.kv_cache_tokens = kv_cache_tokens
        self._retire = retire  # called with the adapter keys in use; returns the stale keys it could drop
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._prefilling: list[Request] = []
        self._running: list[Request] = []
        self._rows: list[tuple[Request, Sequence]] = []  # batch order of the rows of the running requests
        self._cache: Any = None
        self._mask: Any = None  # (rows, padded length) 1 = real token
        self._lengths: list[int] = []  # real tokens per row
        self._prefixes: OrderedDict[tuple, Any] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._exited = False  # the loop has returned (set under the condition, as submit reads it)
        atexit.register(_stop_at_exit, weakref.ref(self))
        self.steps = 0
        self.max_batch_seen = 0
        # engine-thread seconds by phase (read with busy_seconds): where a busy engine's time goes
        self._busy = {"prefill": 0.0, "decode_forward": 0.0, "choose": 0.0, "batch_edit": 0.0}
        self.prefill_tokens = 0

    # --- submitting -------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        rows = len(request.sequences)
        need = rows * request.final_length
        if rows > self.max_rows or need > self.kv_cache_tokens:
            raise ServingError(f"this request needs {need} KV-cache tokens ({rows} row(s) x {request.final_length}), over "
                               f"kv_cache_tokens={self.kv_cache_tokens}; lower max_new_tokens or k, or raise kv_cache_tokens")
        with self._cond:
            self._waiting.append(request)
            if self._thread is None or self._exited:  # both set under the lock: no request joins a thread that left
                self._stopping, self._exited = False, False
                self._thread = threading.Thread(target=self._loop, name="ragtune-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """End the engine thread after its current step and wait for it; requests still in it end with a
        ServingError (their readers never wait forever). Run at interpreter exit: a daemon thread torn down
        inside torch's thread pools aborted the process ("terminate called without an active exception", exit
        status 134) in 3 of 4 short runs. The next request starts a new thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def busy_seconds(self) -> dict[str, float]:
        """Seconds the engine thread spent so far in prompt prefill, batched decode forwards, per-row token
        choice and emission (logits processing: repetition penalty, context-aware mix, grounded constraint;
        then detokenising and stop strings) and batch edits (rows joining and leaving the KV cache);
        ``prefill_tokens`` counts the prompt tokens run."""
        return {**self._busy, "prefill_tokens": float(self.prefill_tokens)}  # written by the engine thread alone

    def stats(self) -> dict[str, int]:
        """Counts of requests by state. ``blocked``: waiting requests the bound (rows, KV-cache tokens) keeps out
        right now; the others are admitted at the engine's next step (a request submitted to an idle engine is
        ``waiting`` for a moment, never ``blocked``)."""
        with self._cond:
            blocked = len(self._waiting) if self._waiting and not self._fits(self._waiting[0]) else 0
            return {"waiting": len(self._waiting), "blocked": blocked, "prefilling": len(self._prefilling),
                    "running": len(self._running), "rows": len(self._rows), "steps": self.steps,
                    "max_batch_seen": self.max_batch_seen}

    def _fits(self, request: Request) -> bool:
        """Whether ``request`` can join the active requests within the bound (always, when none is active)."""
        active = self._running + self._prefilling
        rows = sum(len(r.sequences) for r in active) + len(request.sequences)
        longest = max([r.final_length for r in active] + [request.final_length])
        return not active or (rows <= self.max_rows and rows * longest <= self.kv_cache_tokens)

    def _admit(self) -> None:
        """Move waiting requests (in order: nobody is overtaken) into prefill while the bound holds."""
        while self._waiting:
            request = self._waiting[0]
            if not self._fits(request):
                return
            self._waiting.pop(0)
            request.stream.queued_s = time.perf_counter() - request.submitted
            self._prefilling.append(request)

    # --- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        why = "the engine was stopped"
        try:
            while True:
                with self._cond:
                    self._drop_cancelled()
                    while not (self._waiting or self._prefilling or self._running or self._stopping):
                        self._cond.wait()
                        self._drop_cancelled()
                    if self._stopping:
                        return
                    self._admit()
                try:
                    with self._lock:
                        self._step()
                except Exception as exc:  # noqa: BLE001 - every request of the failed step learns why
                    self._fail(f"generation failed: {exc}")
        except BaseException as exc:  # the loop itself broke: nobody may wait for it forever
            why = f"the engine failed: {exc!r}"
            raise
        finally:
            self._fail(f"{why} before this answer finished; ask again", exiting=True)

    def _step(self) -> None:
        import torch

        with torch.inference_mode():
            if self._prefilling:
                request = self._prefilling[0]
                started = time.perf_counter()
                done = self._prefill_slice(request)
                self._spent("prefill", started)
                if done:
                    with self._cond:
                        self._prefilling.pop(0)
                    self._start(request)
            if self._rows:
                self._decode_step()
        self.steps += 1
        in_use = {s.key for r in self._waiting + self._prefilling + self._running for s in r.sequences}
        self._retire(in_use)

    def _spent(self, phase: str, started: float) -> float:
        now = time.perf_counter()
        self._busy[phase] += now - started
        return now

    def _prefill_slice(self, request: Request) -> bool:
        """One forward pass of at most PREFILL_SLICE prompt tokens; True when every row is prefilled."""
        import torch

        bf16 = request.params.prefill_bf16
        for seq in request.sequences:
            if seq.done == len(seq.ids):
                continue
            if seq.cache is None:
                capacity = len(seq.ids) + request.params.max_new_tokens  # all this row can need: no regrowth
                seq.cache = self._new_cache(capacity=capacity)
                if seq.prefix_len:
                    stored = self._prefixes.get((seq.key, bf16, tuple(seq.ids[:seq.prefix_len])))
                    if stored is not None:
                        self._prefixes.move_to_end((seq.key, bf16, tuple(seq.ids[:seq.prefix_len])))
                        seq.cache = self._new_cache([[kv] for kv in stored], capacity)  # copied: the entry stays
                        seq.done = seq.prefix_len
            end = min(len(seq.ids), seq.done + PREFILL_SLICE)
            if seq.prefix_len and seq.done < seq.prefix_len:
                end = seq.prefix_len  # the prefix is its own slice, so its cache can be kept as is
            ids = torch.tensor([seq.ids[seq.done:end]], dtype=torch.long, device=self._device)
            self.prefill_tokens += end - seq.done
            seq.logits = self._forward(ids, seq.cache, [seq.key], bf16=bf16)[0]
            seq.done = end
            if seq.prefix_len and end == seq.prefix_len:
                key = (seq.key, bf16, tuple(seq.ids[:seq.prefix_len]))
                self._prefixes[key] = [(layer.keys.clone(), layer.values.clone()) for layer in seq.cache.layers]
                while len(self._prefixes) > PREFIX_ENTRIES:
                    self._prefixes.popitem(last=False)
            return False
        return True

    def _start(self, request: Request) -> None:
        """The first token from the prefill logits; then the request's rows join the batch."""
        contrast = request.contrast.logits if request.contrast is not None else None
        started = time.perf_counter()
        request.sampler = Sampler(request.params)
        token = request.sampler.choose(request.main.logits, contrast, request.generated)
        finished = self._emit(request, token)
        started = self._spent("choose", started)
        if finished:
            return
        for seq in request.sequences:
            self._merge(request, seq)
            seq.cache, seq.logits = None, None
        self._spent("batch_edit", started)
        with self._cond:
            self._running.append(request)
        self.max_batch_seen = max(self.max_batch_seen, len(self._rows))

    def _merge(self, request: Request, seq: Sequence) -> None:
        import torch
        import torch.nn.functional as F

        length = len(seq.ids)
        if not self._rows:
            self._cache = seq.cache
            self._mask = torch.ones((1, length), dtype=torch.long, device=self._device)
        else:  # the batch's rows and the new one, each copied once into a buffer left-padded to the wider
            width = self._mask.shape[1]
            target = max(width, length)
            self._cache = self._new_cache([[(old.keys, old.values), (new.keys, new.values)]
                                           for old, new in zip(self._cache.layers, seq.cache.layers)],
                                          target + self._room(request))
            ones = torch.ones((1, length), dtype=torch.long, device=self._device)
            self._mask = torch.cat([F.pad(self._mask, (target - width, 0)), F.pad(ones, (target - length, 0))])
        self._rows.append((request, seq))
        self._lengths.append(length)

    def _room(self, joining: Request | None = None) -> int:
        """Decode steps the batch can still take: the most answer tokens any of its rows (and ``joining``'s)
        may still generate; the batch cache is sized to its width plus this."""
        requests = [r for r, _ in self._rows] + ([joining] if joining is not None else [])
        return max((r.params.max_new_tokens - len(r.generated) for r in requests), default=0)

    def _decode_step(self) -> None:
        import torch

        rows = self._rows
        tokens = torch.tensor([[r.next_token] for r, _ in rows], dtype=torch.long, device=self._device)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=self._device)], dim=1)
        positions = torch.tensor([[n] for n in self._lengths], dtype=torch.long, device=self._device)
        started = time.perf_counter()
        logits = self._forward(tokens, self._cache, [s.key for _, s in rows], mask, positions)
        started = self._spent("decode_forward", started)
        self._mask = mask
        self._lengths = [n + 1 for n in self._lengths]
        main, contrast = {}, {}
        for i, (request, seq) in enumerate(rows):
            (main if seq is request.main else contrast)[id(request)] = logits[i]
        finished = []
        for request in list(self._running):
            if request.cancelled:
                self._finish(request, "stop")
                finished.append(request)
                continue
            token = request.sampler.choose(main[id(request)], contrast.get(id(request)), request.generated)
            if self._emit(request, token):
                finished.append(request)
        started = self._spent("choose", started)
        if finished:
            self._remove(finished)
            self._spent("batch_edit", started)

    def _remove(self, requests: list[Request]) -> None:
        import torch

        gone = {id(r) for r in requests}
        keep = [i for i, (r, _) in enumerate(self._rows) if id(r) not in gone]
        with self._cond:
            self._running = [r for r in self._running if id(r) not in gone]
        if not keep:
            self._rows, self._lengths, self._cache, self._mask = [], [], None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        self._rows = [self._rows[i] for i in keep]
        self._lengths = [self._lengths[i] for i in keep]
        self._mask = self._mask[index]
        trim = self._mask.shape[1] - max(self._lengths)  # columns that are padding in every remaining row
        self._mask = self._mask[:, trim:]
        runs = []  # the kept rows as runs of neighbours: views of the old cache, copied once into the new one
        for i in keep:
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        self._cache = self._new_cache([[(layer.keys[a:b, :, trim:], layer.values[a:b, :, trim:]) for a, b in runs]
                                       for layer in self._cache.layers], self._mask.shape[1] + self._room())

    # --- output -------------------------------------------------------------------------------
    def _emit(self, request: Request, token: int) -> bool:
        """Record ``token`` for ``request`` and pass on the text that is safe to show; True when it is done."""
        stream, params = request.stream, request.params
        if request.cancelled:
            return self._finish(request, "stop")
        if token in self._eos:
            return self._finish(request, "stop")
        request.generated.append(token)
        stream.completion_tokens = len(request.generated)
        piece = request.stops.feed(self._decode(request.generated))
        if piece:
            request.out.put(piece)
        if request.stops.stopped:
            return self._finish(request, "stop")
        if len(request.generated) >= params.max_new_tokens:
            return self._finish(request, "length")
        request.next_token = token
        return False

    def _finish(self, request: Request, reason: str) -> bool:
        request.stream.finish_reason = reason
        if request.params.constraint is not None:
            request.params.constraint.finish()
        if not request.stops.stopped and not request.cancelled:
            tail = request.stops.flush(self._decode(request.generated))
            if tail:
                request.out.put(tail)
        request.finished = True
        request.out.put(_END)
        return True

    def cancel(self, request: Request) -> None:
        """From any thread: the request's rows leave the batch at the next step and its reader gets the end."""
        request.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def _drop_cancelled(self) -> None:
        """Called with the condition held: cancelled requests that hold no batch rows leave now."""
        for bucket in (self._waiting, self._prefilling):
            for request in [r for r in bucket if r.cancelled]:
                bucket.remove(request)
                request.finished = True
                request.out.put(_END)

    def _fail(self, message: str, exiting: bool = False) -> None:
        """End the batch's requests (and, when the loop is ``exiting``, the waiting ones too) with a
        ServingError saying ``message``, and empty the batch. On exit ``_exited`` is set under the same lock,
        so a request submitted after it starts a new thread instead of waiting on this one."""
        with self._cond:
            everyone = self._prefilling + self._running + (self._waiting if exiting else [])
            self._prefilling, self._running = [], []
            self._rows, self._lengths, self._cache, self._mask = [], [], None, None
            if exiting:
                self._waiting, self._exited = [], True
        for request in everyone:
            request.finished = True
            request.out.put(ServingError(message))


def _stop_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.stop()


def read_pieces(request: Request):
    """The generator behind a local :class:`TokenStream`: pieces from the engine until the end; closing it
    (a client gone, Streamlit's stop) cancels the request, and the engine drops its rows at the next step."""
    stream = request.stream
    try:
        while True:
            item = request.out.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if not request.finished:
            request.cancelled = True
        stream.finished_s = time.perf_counter() - stream.started
