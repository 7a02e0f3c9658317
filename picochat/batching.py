"""Continuous batching for the server: a Scheduler runs many Requests over one Engine's model, each in its own
row of a shared StaticCache, streaming events to each request's emit callback.

    sched = Scheduler(engine, slots=8).start()
    req = sched.submit(Request(prompt=ids, max_tokens=64, temperature=0.8, emit=on_event))
    ...
    sched.cancel(req)  # frees its slot at the next step boundary
    sched.stop()
"""
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from prometheus_client import Histogram

from picochat.common import UserError
from picochat.engine import Engine, StaticCache, ToolState, sample, softcap


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Request:
    """One generation for the Scheduler. emit(event) is called from the scheduler thread with
    ("token", token, forced, logprob) per token, logprob = None or (logprob, [(token, logprob) x top_n]),
    then exactly once ("done", reason, n_generated), reason: stop | length | cancelled | error: <text>."""
    prompt: list
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; N >= 0: the chosen token's and the top N
    emit: Callable = lambda event: None
    cancelled: bool = False
    # scheduler state
    slot: int | None = None
    generated: int = 0
    next_input: int | None = None
    state: ToolState | None = None
    generator: torch.Generator | None = None
    tool_future: Future | None = None
    held_logits: torch.Tensor | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: bool = False


class Scheduler:
    """Continuous batching over a fixed batch of cache rows (slots). A background thread loops: drop cancelled
    requests, admit queued ones into free slots (prefill that row alone), then one batched decode step for every
    active slot, each row at its own position. A finished or cancelled request frees its slot at the next step
    boundary. A row whose tool call is being evaluated (in a thread pool) sits out steps meanwhile. The decode
    step covers rows [0, highest busy slot]; idle rows in between get a dummy token at their own position,
    which is overwritten before it is ever attended to."""

    def __init__(self, engine: Engine, slots=8, max_queue=256, max_len=None, threads=0):
        self.engine = engine
        # torch threads of the scheduler's thread (0: torch's default). Give the caller's thread one thread
        # before it touches the model (serve does): libgomp keeps a team per thread that ever ran a parallel
        # region, and once a process's OpenMP threads outnumber its cores it cuts every team's spin-wait to ~100
        # spins, so each of a decode step's parallel products waits for a wake-up (measured: 2-thread batch-1
        # decode 210 -> 120 tok/s once a second thread had run a 2-thread region).
        self.threads = threads
        self.net = engine.net
        self.num_slots = slots
        self.max_queue = max_queue
        self.max_len = min(max_len or engine.max_context, engine.max_context)
        self.cache = StaticCache(engine.model.config, slots, self.max_len, engine.device, self.net.dtype,
                                 static=self.net.static)
        self.slots = [None] * slots
        self.pending = deque()
        self.jobs = deque()
        self.cond = threading.Condition()
        self.tool_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="picochat-tool")
        self.min_step_time = 0.0  # seconds; > 0 slows decoding down (tests and demos of streaming)
        self.stats = {"requests": 0, "finished": {}, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0,
                      "step_seconds": 0.0, "errors": 0}
        # registered in no registry: the server registers them in its app's own (see picochat/metrics.py)
        self.latency = Histogram("picochat_generation_seconds", "Submit to last token.", registry=None,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("picochat_time_to_first_token_seconds", "Submit to first token.", registry=None,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="picochat-scheduler", daemon=True)

    # ---- the outside: any thread ----------------------------------------------------------------------------
    def start(self):
        self._thread.start()
        return self

    def stop(self):
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        self._thread.join(timeout=10)
        self.tool_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def active(self):
        return sum(r is not None for r in self.slots)

    @property
    def queued(self):
        return len(self.pending)

    def submit(self, req: Request):
        prompt = self.engine.check_prompt(req.prompt)
        if len(prompt) >= self.max_len:
            raise UserError(f"prompt of {len(prompt)} tokens leaves no room in the server's context of "
                            f"{self.max_len} tokens: shorten it")
        req.prompt = prompt
        with self.cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.pending) >= self.max_queue + self.slots.count(None):
                raise QueueFull(f"{len(self.pending)} requests are already waiting: try again shortly")
            self.pending.append(req)
            self.stats["requests"] += 1
            self.cond.notify_all()
        return req

    def cancel(self, req: Request):
        """Free the request's slot at the next step boundary (its client went away, or it hit a stop string)."""
        req.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def run_job(self, fn) -> Future:
        """Run fn() on the scheduler thread between two decode steps (the model is never used concurrently)."""
        fut = Future()
        with self.cond:
            self.jobs.append((fut, fn))
            self.cond.notify_all()
        return fut

    # ---- the scheduler thread --------------------------------------------------------------------------------
    def _run(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self.cond:
                while not (self._stopping or self.pending or self.jobs or any(self.slots)):
                    self.cond.wait()
                if self._stopping:
                    break
                jobs = list(self.jobs)
                self.jobs.clear()
            for fut, fn in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        with torch.inference_mode():
                            fut.set_result(fn())
                    except BaseException as e:  # the caller reports it
                        fut.set_exception(e)
            t0 = time.perf_counter()
            try:
                self._drop_cancelled()
                self._admit()
                stepped = self._step()
            except Exception as e:  # a failed step must not take the server down: fail the batch, go on
                self.stats["errors"] += 1
                for r in list(self.slots):
                    if r is not None:
                        self._finish(r, f"error: {e.__class__.__name__}: {e}")
                continue
            if not stepped and any(self.slots):  # every busy row waits on its tool call
                with self.cond:
                    self.cond.wait(timeout=0.002)
            elif self.min_step_time:
                time.sleep(max(0.0, self.min_step_time - (time.perf_counter() - t0)))
        for r in list(self.slots) + list(self.pending):
            if r is not None:
                self._finish(r, "cancelled")
        self.pending.clear()

    def _emit(self, req, event):
        try:
            req.emit(event)
        except Exception:  # a consumer that went away must not stop the loop
            req.cancelled = True

    def _finish(self, req, reason):
        if req.finished:
            return
        req.finished = True
        if req.slot is not None:
            self.slots[req.slot] = None
            self.cache.lens[req.slot] = 0
            req.slot = None
        if req.tool_future is not None:
            req.tool_future.cancel()
        req.held_logits = None
        key = reason.split(":")[0]
        self.stats["finished"][key] = self.stats["finished"].get(key, 0) + 1
        self.latency.observe(time.perf_counter() - req.submitted)
        self._emit(req, ("done", reason, req.generated))

    def _drop_cancelled(self):
        for r in self.slots:
            if r is not None and r.cancelled:
                self._finish(r, "cancelled")
        with self.cond:
            gone = [r for r in self.pending if r.cancelled]
            for r in gone:
                self.pending.remove(r)
        for r in gone:
            self._finish(r, "cancelled")

    def _admit(self):
        while True:
            with self.cond:
                if not self.pending or None not in self.slots:
                    return
                req = self.pending.popleft()
            s = self.slots.index(None)
            dev = self.engine.device
            self.net.refresh()
            with torch.inference_mode():
                h = self.net.hidden(torch.tensor([req.prompt], device=dev), self.cache, slice(s, s + 1), [0])
                logits = self.net.logits(h[:, -1])[0]
            self.cache.lens[s] = len(req.prompt)
            self.slots[s] = req
            req.slot = s
            req.state = ToolState(self.engine.python_ids)
            req.generator = torch.Generator(device=dev)
            if req.seed is None:
                req.generator.seed()
            else:
                req.generator.manual_seed(req.seed)
            self.stats["prompt_tokens"] += len(req.prompt)
            self._choose(req, logits)

    def _choose(self, req, logits, greedy=None):
        """Pick the request's next token from its logits row (or a forced one), emit it, check for the end."""
        if req.tool_future is not None:
            if not req.tool_future.done():
                req.next_input, req.held_logits = None, logits  # sits out steps until the tool answers
                return
            try:
                req.state.forced.extend(req.tool_future.result())
            except Exception:
                pass  # a failed tool call forces nothing
            req.tool_future = None
        if req.state.forced:
            tok, forced, call = req.state.next(None)
        else:
            if greedy is not None and (req.temperature is None or req.temperature <= 0):
                sampled = greedy
            else:
                with torch.inference_mode():
                    sampled = int(sample(logits[None], req.temperature, req.top_k, req.top_p, req.generator,
                                         self.engine.softcap)[0])
            tok, forced, call = req.state.next(sampled)
        if call is not None and self.engine.tool:
            req.tool_future = self.tool_pool.submit(self.engine.tool_tokens, call)
        lp = None
        if req.logprobs is not None:
            with torch.inference_mode():
                logp = torch.log_softmax(softcap(logits.float(), self.engine.softcap), dim=-1)
                top = []
                if req.logprobs > 0:
                    tv, ti = torch.topk(logp, req.logprobs)
                    top = list(zip(ti.tolist(), tv.tolist()))
                lp = (float(logp[tok]), top)
        req.generated += 1
        self.stats["generated_tokens"] += 1
        if req.first_token is None:
            req.first_token = time.perf_counter()
            self.ttft.observe(req.first_token - req.submitted)
        req.next_input, req.held_logits = tok, None
        self._emit(req, ("token", tok, forced, lp))
        if tok in self.engine.stop_ids and not forced:
            self._finish(req, "stop")
        elif req.generated >= req.max_tokens or self.cache.lens[req.slot] + 1 > self.max_len:
            self._finish(req, "length")

    def _step(self):
        """One decode step for every slot that has its next input. Returns False if no row could run."""
        for r in self.slots:  # rows that waited on a tool call and can go on now
            if r is not None and r.next_input is None and r.tool_future is not None and r.tool_future.done():
                self._choose(r, r.held_logits)
        busy = [i for i, r in enumerate(self.slots) if r is not None]
        if not busy:
            return False
        hi = busy[-1] + 1
        ready = [i for i in busy if self.slots[i].next_input is not None]
        if not ready:
            return False
        t0 = time.perf_counter()
        ids = [[self.slots[i].next_input if i in ready else 0] for i in range(hi)]
        start = self.cache.lens[:hi]
        with torch.inference_mode():
            h = self.net.hidden(torch.tensor(ids, device=self.engine.device), self.cache, slice(0, hi), start)
            logits = self.net.logits(h[:, 0])
            greedy = logits.argmax(-1).tolist() if any(
                (self.slots[i].temperature or 0) <= 0 for i in ready) else None
        for i in ready:
            self.cache.lens[i] += 1
        for i in ready:
            req = self.slots[i]
            if req is None:
                continue
            if req.cancelled:
                self._finish(req, "cancelled")
            else:
                self._choose(req, logits[i], greedy[i] if greedy is not None else None)
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - t0
        return True

