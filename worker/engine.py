"""The continuous-batching loop: admit, prefill newcomers, decode the batch, publish, retire rows.

The engine talks to the world only through `RequestSource` and `EventSink` (Redis/RQ lives behind
them), so it runs the same in tests with in-memory fakes.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Protocol, Sequence

import torch

from common.schemas import ErrorEvent, Event, FinalEvent, GenerationJob
from common.settings import LimitSettings, WorkerSettings

from .batch import Batch, Row, new_rows
from .detokenize import make_decoder
from .metrics import EngineMetrics
from .model import LoadedModel, forward
from .paged.blocks import BlockPool
from .paged.cache import KVPool
from .paged.prefill import PagedPrefill
from .prefill import PendingPrefill
from .chooser import TokenChooser
from .constraints import GrammarError, Grammars
from .sampling import Choice, make_generator
from .scheduler import Budget, Entry, Scheduler, prefill_groups
from .watermark import Watermark

log = logging.getLogger(__name__)


class RequestSource(Protocol):
    def fetch(self, max_jobs: int) -> list[GenerationJob]: ...   # non-blocking; up to max_jobs waiting jobs, already leased/marked started
    def wait(self, timeout: float) -> None: ...                   # block until work may be waiting, or timeout; used only when the engine is idle
    def give_back(self, jobs: list[GenerationJob]) -> None: ...   # unfinished jobs on shutdown: re-queue them at the head


class EventSink(Protocol):
    def step_done(self, events: list[Event], running: list[GenerationJob]) -> set[str]: ...
    # called once per step with ALL of the step's events (token, final, error) and the rows still running;
    # publishes the events, renews leases, and returns the request_ids (among running) that were cancelled. One round trip.
    # A sink may overlap that round trip with the next step (worker.pipelined): the ids then arrive one step later.
    def finished(self, leaving: Sequence[tuple[GenerationJob, FinalEvent | ErrorEvent | None]]) -> None: ...
    # called once per step with every job that left: its final/error event, or None when it was cancelled


Leaving = list[tuple[GenerationJob, "FinalEvent | ErrorEvent | None"]]


def server_error(job: GenerationJob, message: str, error_type: str = "generation") -> ErrorEvent:
    """TGI's shard failure shape; the API prefixes 'Request failed during generation: '. `error_type`
    "constraint": the job's own output constraint failed (common.errors.ConstraintFailed)."""
    return ErrorEvent(request_id=job.request_id, attempt=job.attempt, message=f"Server error: {message}",
                      error_type=error_type)


class Engine:
    """Owns the running batch and steps it; one engine per model process."""

    def __init__(self, loaded_model: LoadedModel, worker_settings: WorkerSettings, limits: LimitSettings,
                 source: RequestSource, sink: EventSink, metrics: EngineMetrics | None = None) -> None:
        self.loaded = loaded_model
        self.settings = worker_settings
        self.limits = limits
        self.source = source
        self.sink = sink
        self.metrics = metrics if metrics is not None else EngineMetrics(worker_settings.max_batch_size)
        self.scheduler: Scheduler[GenerationJob] = Scheduler(Budget.from_settings(worker_settings, limits))
        self.batch: Batch | None = None
        self.pending: deque[PendingPrefill] = deque()  # admitted groups whose prompts are being fed
        self.admitting = True
        tokenizer = loaded_model.tokenizer
        self._decode = decode = make_decoder(tokenizer)
        # A lone id's text (prefill, top). Not through self: a dropped engine then frees its KV pool at
        # once, not whenever the cyclic collector runs.
        self._decode_one: Callable[[int], str] = lambda t: decode([t])
        self._decode_final: Callable[[list[int]], str] = (
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        self._num_layers = int(loaded_model.model.config.num_hidden_layers)
        self.blocks: BlockPool | None = None
        self.kv: KVPool | None = None
        fast = loaded_model.fast
        if worker_settings.kv_cache == "paged" or (
                worker_settings.kv_cache == "auto" and fast is not None
                and (fast.kernel_attention or fast.paged_kernel is not None)):
            self._make_paged_cache()
        # Plain greedy batches take the argmax and logprob of the bf16 logits in one compiled pass.
        self.chooser = TokenChooser(Watermark(loaded_model.vocab_size, loaded_model.device),
                                    fast.kernels.greedy if fast is not None and fast.kernel_greedy else None,
                                    on_mask=self.metrics.observe_grammar_mask)
        self.grammars = Grammars(tokenizer, loaded_model.vocab_size, loaded_model.eos_token_id)

    def _make_paged_cache(self) -> None:
        """The block pool: the running batch's whole token budget (one partly filled block per row on
        top), plus room for cached prefixes."""
        fast, s = self.loaded.fast, self.settings
        if fast is None:
            log.warning("--kv-cache paged needs the fused forward; this model keeps the slot cache")
            return
        bs = s.kv_block_size
        tokens = self.scheduler.budget.max_batch_total_tokens + s.prefix_cache_tokens
        num_blocks = -(-tokens // bs) + s.max_batch_size
        self.blocks = BlockPool(num_blocks, bs, prefix_cache=s.prefix_cache)
        self.kv = KVPool(len(fast.layers), num_blocks, bs, fast.n_kv, fast.head_dim, self.loaded.dtype,
                         self.loaded.device)
        log.info("paged KV cache: %d blocks of %d tokens, prefix cache %s", num_blocks, bs,
                 "on" if s.prefix_cache else "off")

    # ---- one step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, prefill, decode once, publish the step's events, retire rows. True if any work is held."""
        events: list[Event] = []
        leaving: Leaving = []
        worked = False
        self._fetch(events, leaving)
        if self.admitting and not self.pending:
            admitted = [e.item for e in self.scheduler.admit()]
            if admitted:
                self._start_prefill(admitted)
        if self.pending:
            self._prefill_some(events, leaving)
            if events and self.batch is not None:
                # The newcomers' first tokens go out now, not after the decode step below: time to
                # first token is the prefill, not the prefill plus a step of the whole batch.
                self._publish(events, leaving)
                worked, events = True, []
        if self.batch is not None:
            self._decode_step(events, leaving)
        else:
            self.metrics.set_current_size(0)
        if events or self.held_jobs():
            self._publish(events, leaving)
        if leaving:
            self.sink.finished(leaving)
        return worked or bool(events or self.held_jobs())

    def _publish(self, events: list[Event], leaving: Leaving) -> None:
        """Hand the events to the sink (one round trip) and retire the rows that finished or were cancelled."""
        cancelled = self.sink.step_done(events, self.held_jobs())
        self._drop_cancelled(cancelled, leaving)
        self._retire()

    def held_jobs(self) -> list[GenerationJob]:
        """Jobs this engine holds and has not finished: unfinished batch rows, then the local waiting list."""
        return self._rows_held() + [e.item for e in self.scheduler.waiting]

    def _rows_held(self) -> list[GenerationJob]:
        """Unfinished rows: in the batch, then still being prefilled."""
        return [r.job for r in self._all_rows() if r.active]

    def _all_rows(self) -> list[Row]:
        """Every row this engine has admitted: the batch's, then those of pending prefills."""
        rows = list(self.batch.rows) if self.batch is not None else []
        return rows + [r for group in self.pending for r in group.rows]

    def _fetch(self, events: list[Event], leaving: Leaving) -> None:
        """Pull jobs only while they could join soon, rejecting those the model cannot run."""
        if not self.admitting:
            return
        room = self.scheduler.room()
        if room <= 0:
            return
        for job in self.source.fetch(room):
            problem, kind = self._invalid(job), "generation"
            if problem is None and job.grammar is not None:
                problem, kind = self._grammar_problem(job.grammar), "constraint"
            if problem:
                error = server_error(job, problem, kind)
                events.append(error)
                leaving.append((job, error))
                continue
            cached = 0
            if self.blocks is not None and not job.want_prefill:
                cached = len(self.blocks.cached_prefix(job.input_ids)) * self.blocks.block_size
            self.scheduler.add(Entry(job.request_id, job, len(job.input_ids), job.stopping.max_new_tokens,
                                     cached_tokens=cached))

    def _invalid(self, job: GenerationJob) -> str | None:
        """Why the model cannot run this job (None if it can)."""
        if not job.input_ids:
            return "the prompt has no tokens"
        vocab = self.loaded.vocab_size
        bad = next((i for i in job.input_ids if not 0 <= i < vocab), None)
        if bad is not None:
            return f"input id {bad} is out of range for a vocabulary of {vocab}"
        if job.stopping.max_new_tokens < 1:
            return "`max_new_tokens` must be strictly positive"
        return None

    def _grammar_problem(self, grammar: str) -> str | None:
        """Why the job's output constraint cannot be followed (None if it can)."""
        try:
            self.grammars.matcher(grammar)  # compiled once here; each row copies it
        except GrammarError as exc:
            return str(exc)
        return None

    # ---- prefill and decode ---------------------------------------------------------------------

    def _start_prefill(self, jobs: list[GenerationJob]) -> None:
        """Queue newcomers for prefill, in groups of similar prompt length."""
        self.metrics.observe_next_size(len(jobs))
        rows = new_rows(jobs, self.loaded.eos_token_id, self._decode, make_generator, time.time())
        for row in rows:
            if row.job.grammar is not None:
                row.constraint = self.grammars.matcher(row.job.grammar)
        if self.blocks is not None and self.kv is not None:  # packed without padding: one group
            hit, miss = self.blocks.hit_tokens, self.blocks.miss_tokens
            self.pending.append(PagedPrefill(rows, self.loaded, self.blocks, self.kv))
            self.metrics.observe_prefix_cache(self.blocks.hit_tokens - hit, self.blocks.miss_tokens - miss)
            return
        for group in prefill_groups([r.prompt_len for r in rows]):
            self.pending.append(PendingPrefill([rows[i] for i in group], self.loaded, self._num_layers,
                                               self.settings.max_batch_size))

    def _prefill_some(self, events: list[Event], leaving: Leaving) -> None:
        """Advance the pending prefills: all of them on an idle batch, else one chunk's worth of tokens.

        The chunk bounds how long the running rows pause for newcomers. When more rows wait for their
        first token than are running (a wave of arrivals next to a few early rows), the budget grows
        by that ratio: a few rows pause longer so that many more start sooner."""
        chunk = self.settings.prefill_chunk_tokens
        budget = None
        if chunk > 0 and self.batch is not None:
            newcomers = sum(1 for group in self.pending for row in group.rows if row.active)
            budget = chunk * max(1, newcomers // len(self.batch))
        while self.pending:
            group = self.pending[0]
            t0 = time.perf_counter()
            try:
                logits, fed = group.advance(budget if budget is not None else group.remaining_tokens)
                if logits is not None:
                    self.pending.popleft()
                    newcomers = self._first_tokens(group, logits, events)
            except Exception as exc:  # the error boundary: fail this prefill's rows, keep serving
                if self.pending and self.pending[0] is group:
                    self.pending.popleft()
                group.cache.release()
                self._fail([r for r in group.rows if r.active], exc, "prefill", time.perf_counter() - t0,
                           events, leaving)
                continue
            self.metrics.observe_inference("prefill", time.perf_counter() - t0, True)
            if logits is None:
                return  # this step's budget is spent
            self._join(newcomers, leaving)
            if budget is not None:
                budget -= fed
                if budget <= 0:
                    return

    def _first_tokens(self, group: PendingPrefill, logits: torch.Tensor, events: list[Event]) -> Batch:
        """The fully prefilled group becomes a batch with each row's first token chosen and emitted."""
        rows, mask = group.rows, group.batch_mask()
        for i, row in enumerate(rows):
            if row.job.want_prefill:
                row.prefill = group.prefill_details(i, self._decode_one)
        batch = Batch(rows=rows, cache=group.cache, mask=mask, next_pos=mask.sum(dim=1),
                      last_ids=torch.zeros(len(rows), dtype=torch.long, device=self.loaded.device),
                      vocab_size=self.loaded.vocab_size, device=self.loaded.device)
        choice = self.chooser.choose(logits, batch)
        batch.last_ids = choice.ids
        batch.note_seen(choice.ids)
        self._emit(batch, choice, events)
        return batch

    def _join(self, newcomers: Batch, leaving: Leaving) -> None:
        """Rows still generating after their first token join the running batch (no restart)."""
        self._collect_finished(newcomers, leaving)
        keep = [i for i, r in enumerate(newcomers.rows) if r.active]
        if not keep:
            newcomers.close()
            return
        newcomers.filter(keep)
        if self.batch is None:
            self.batch = newcomers
        else:
            self.batch.concatenate(newcomers)

    def _decode_step(self, events: list[Event], leaving: Leaving) -> None:
        """One forward over the running batch and one token per row."""
        batch = self.batch
        if batch is None:
            return
        self.metrics.set_current_size(len(batch))
        t0 = time.perf_counter()
        try:
            input_ids, mask, positions = batch.decode_inputs()
            out = forward(self.loaded, input_ids, mask, positions, batch.cache, logits_to_keep=1)
            choice = self.chooser.choose(out.logits[:, -1, :], batch)
            batch.advance(choice.ids)
            self._emit(batch, choice, events)
        except Exception as exc:  # the error boundary: fail the whole batch, keep serving
            self.batch = None
            batch.cache.release()
            self._fail(batch.rows, exc, "decode", time.perf_counter() - t0, events, leaving)
            return
        self.metrics.observe_inference("decode", time.perf_counter() - t0, True)
        self.scheduler.on_step()
        self._collect_finished(batch, leaving)

    def _emit(self, batch: Batch, choice: Choice, events: list[Event]) -> None:
        """Turn the chosen ids into per-row events (one host transfer for the whole batch, one more for
        the alternatives of the rows that ask)."""
        pairs = torch.stack([choice.ids.double(), choice.logprobs.double()]).tolist()
        special = self.loaded.special_ids
        top = choice.top.tokens(self._decode_one, special) if choice.top is not None else {}
        for i, (row, token_id, logprob) in enumerate(zip(batch.rows, pairs[0], pairs[1])):
            if row.cancelled:  # cancelled while its prefill ran: it leaves without another event
                continue
            if i in choice.failed:
                row.error = server_error(row.job, choice.failed[i], "constraint")  # it leaves the batch
                events.append(row.error)
                continue
            events.append(row.accept(int(token_id), float(logprob), special, self._decode_final, top.get(i, ())))

    def _fail(self, rows: Sequence[Row], exc: Exception, method: str, seconds: float,
              events: list[Event], leaving: Leaving) -> None:
        log.exception("%s failed for %d rows", method, len(rows))
        self.metrics.observe_inference(method, seconds, False)
        failed = {r.job.request_id for r in rows}
        # Token events this step already built for these rows are superseded by the error.
        events[:] = [e for e in events if e.request_id not in failed]
        for row in rows:
            error = server_error(row.job, str(exc))
            events.append(error)
            leaving.append((row.job, error))
            self.scheduler.release(row.job.request_id)
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- leaving rows ---------------------------------------------------------------------------

    def _collect_finished(self, batch: Batch, leaving: Leaving) -> None:
        for row in batch.rows:
            if row.finish is not None or row.error is not None:
                self.scheduler.release(row.job.request_id)
                leaving.append((row.job, row.final_event if row.error is None else row.error))

    def _drop_cancelled(self, cancelled: set[str], leaving: Leaving) -> None:
        """Cancelled rows leave now (no final event); cancelled waiting jobs are forgotten."""
        if not cancelled:
            return
        for entry in self.scheduler.remove_waiting(set(cancelled)):
            leaving.append((entry.item, None))
        for row in self._all_rows():
            if row.job.request_id in cancelled and row.active:
                row.cancelled = True
                self.scheduler.release(row.job.request_id)
                leaving.append((row.job, None))

    def _retire(self) -> None:
        """Filter finished and cancelled rows out of the batch (compacting its padding)."""
        if self.batch is None:
            return
        keep = [i for i, r in enumerate(self.batch.rows) if r.active]
        if not keep:
            self.batch.close()
            self.batch = None
            self.metrics.set_current_size(0)
        elif len(keep) < len(self.batch):
            self.batch.filter(keep)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool], grace_s: float, idle_wait_s: float = 1.0) -> None:
        """Step until `should_stop()`; then stop admitting, finish rows for up to `grace_s`, give back the rest."""
        deadline: float | None = None
        try:
            while True:
                if deadline is None and should_stop():
                    deadline = time.monotonic() + grace_s
                    self.admitting = False
                    self._give_back([e.item for e in self.scheduler.take_waiting()])
                if deadline is not None and ((self.batch is None and not self.pending)
                                             or time.monotonic() >= deadline):
                    break
                busy = self.step()
                if not busy and deadline is None:
                    self.source.wait(idle_wait_s)
        finally:
            self._give_back(self.unfinished_jobs())  # empties the pending prefills too
            self.batch = None

    def unfinished_jobs(self) -> list[GenerationJob]:
        """Everything still held (running rows, rows in prefill, then waiting), emptying the waiting list."""
        rows = self._rows_held()
        self.pending.clear()
        return rows + [e.item for e in self.scheduler.take_waiting()]

    def _give_back(self, jobs: list[GenerationJob]) -> None:
        if not jobs:
            return
        try:
            self.source.give_back(jobs)
        except Exception:  # shutting down: report, never mask the reason we are stopping
            log.exception("could not give back %d jobs", len(jobs))

