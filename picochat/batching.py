"""Continuous batching for the server: a Scheduler runs many Requests over one Engine's model, each in its own
row of a shared StaticCache, streaming events to each request's emit callback.

    sched = Scheduler(engine, slots=8).start()
    gen = sched.submit(Request(prompt=ids, max_tokens=64, temperature=0.8, emit=on_event))
    ...
    sched.cancel(gen)  # frees its slot at the next step boundary
    sched.stop()

A Request is what the caller asks for and never changes; submit returns the Generation that the scheduler runs for
it (its slot, its tool call, its counters): what the caller cancels and reads `finished` and `generated` from. Each
token goes through Engine.next_token, the step Engine.generate takes too (forced tool output, tool calls, stop
tokens); tool calls run in a thread pool here, so one row's call never stalls the others.
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
from picochat.decode import StaticCache, softcap
from picochat.engine import Engine, ToolState, sample


class QueueFull(Exception):
    pass


@dataclass(frozen=True, eq=False)
class Request:
    """One generation for the Scheduler, as the caller asks for it. emit(event) is called from the scheduler thread
    with ("token", token, forced, logprob) per token, logprob = None or (logprob, [(token, logprob) x top_n]),
    then exactly once ("done", reason, n_generated), reason: stop | length | cancelled | error: <text>."""
    prompt: list
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; N >= 0: the chosen token's and the top N
    emit: Callable = lambda event: None


@dataclass(eq=False)
class Generation:
    """A submitted Request as the scheduler runs it: what submit returns. The caller reads `finished` and
    `generated` and passes it to cancel(); everything else belongs to the scheduler thread."""
    request: Request
    prompt: list  # the request's prompt, checked
    cancelled: bool = False
    finished: bool = False
    generated: int = 0
    slot: int | None = None
    next_input: int | None = None  # the token to decode next; None while a tool call runs
    tool: ToolState | None = None
    generator: torch.Generator | None = None
    tool_future: Future | None = None
    held_logits: torch.Tensor | None = None  # the logits the row resumes from once its tool call returns
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


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

    def submit(self, req: Request) -> Generation:
        """Queue req; its Generation. UserError for a prompt that does not fit, QueueFull when the queue is."""
        prompt = self.engine.check_prompt(req.prompt)
        if len(prompt) >= self.max_len:
            raise UserError(f"prompt of {len(prompt)} tokens leaves no room in the server's context of "
                            f"{self.max_len} tokens: shorten it")
        gen = Generation(req, prompt)
        with self.cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.pending) >= self.max_queue + self.slots.count(None):
                raise QueueFull(f"{len(self.pending)} requests are already waiting: try again shortly")
            self.pending.append(gen)
            self.stats["requests"] += 1
            self.cond.notify_all()
        return gen

    def cancel(self, gen: Generation):
        """Free the generation's slot at the next step boundary (its client went away, or it hit a stop string)."""
        gen.cancelled = True
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

    def _emit(self, gen, event):
        try:
            gen.request.emit(event)
        except Exception:  # a consumer that went away must not stop the loop
            gen.cancelled = True

    def _finish(self, gen, reason):
        if gen.finished:
            return
        gen.finished = True
        if gen.slot is not None:
            self.slots[gen.slot] = None
            self.cache.lens[gen.slot] = 0
            gen.slot = None
        if gen.tool_future is not None:
            gen.tool_future.cancel()
        gen.held_logits = None
        key = reason.split(":")[0]
        self.stats["finished"][key] = self.stats["finished"].get(key, 0) + 1
        self.latency.observe(time.perf_counter() - gen.submitted)
        self._emit(gen, ("done", reason, gen.generated))

    def _drop_cancelled(self):
        for g in self.slots:
            if g is not None and g.cancelled:
                self._finish(g, "cancelled")
        with self.cond:
            gone = [g for g in self.pending if g.cancelled]
            for g in gone:
                self.pending.remove(g)
        for g in gone:
            self._finish(g, "cancelled")

    def _admit(self):
        """Queued generations into free slots: prefill each one's row alone, then take its first token."""
        while True:
            with self.cond:
                if not self.pending or None not in self.slots:
                    return
                gen = self.pending.popleft()
            s = self.slots.index(None)
            self.net.refresh()
            try:
                with torch.inference_mode():
                    logits = self.engine.prefill(gen.prompt, self.cache, s)
            except Exception as e:  # this prompt's own failure (it holds no slot yet): the others go on
                self.stats["errors"] += 1
                self._finish(gen, f"error: {e.__class__.__name__}: {e}")
                continue
            self.cache.lens[s] = len(gen.prompt)
            self.slots[s] = gen
            gen.slot = s
            gen.tool = ToolState(self.engine.python_ids)
            gen.generator = torch.Generator(device=self.engine.device)
            if gen.request.seed is None:
                gen.generator.seed()
            else:
                gen.generator.manual_seed(gen.request.seed)
            self.stats["prompt_tokens"] += len(gen.prompt)
            self._choose(gen, logits)

    # ---- one token of one generation: _choose and its steps -------------------------------------------------------
    def _choose(self, gen, logits, greedy=None):
        """The generation's next token from its logits row (or the tool's output): emit it, check for the end."""
        if not self._tool_answered(gen, logits):
            return
        sampled = None if gen.tool.forced else self._sample(gen, logits, greedy)
        tok, forced, call, stop = self.engine.next_token(gen.tool, sampled)
        if call is not None:
            gen.tool_future = self.tool_pool.submit(self.engine.tool_tokens, call)
        lp = self._logprobs(gen, logits, tok)
        self._count(gen)
        gen.next_input, gen.held_logits = tok, None
        self._emit(gen, ("token", tok, forced, lp))
        if stop:
            self._finish(gen, "stop")
        elif gen.generated >= gen.request.max_tokens or self.cache.lens[gen.slot] + 1 > self.max_len:
            self._finish(gen, "length")

    def _tool_answered(self, gen, logits):
        """False while the generation's tool call runs: its row sits out steps, holding these logits. Once the call
        returns, its output waits in gen.tool.forced (nothing when it failed)."""
        if gen.tool_future is None:
            return True
        if not gen.tool_future.done():
            gen.next_input, gen.held_logits = None, logits
            return False
        try:
            gen.tool.forced.extend(gen.tool_future.result())
        except Exception:
            pass  # a failed tool call forces nothing
        gen.tool_future = None
        return True

    def _sample(self, gen, logits, greedy):
        """A token from the logits row with the request's sampling; greedy: the step's argmax, when it has one."""
        req = gen.request
        if greedy is not None and (req.temperature is None or req.temperature <= 0):
            return greedy
        with torch.inference_mode():
            return int(sample(logits[None], req.temperature, top_k=req.top_k, top_p=req.top_p,
                              generator=gen.generator, cap=self.engine.softcap)[0])

    def _logprobs(self, gen, logits, tok):
        """None, or (tok's logprob, [(token, logprob) x top_n]) when the request asked for logprobs."""
        top_n = gen.request.logprobs
        if top_n is None:
            return None
        with torch.inference_mode():
            logp = torch.log_softmax(softcap(logits.float(), self.engine.softcap), dim=-1)
            top = []
            if top_n > 0:
                tv, ti = torch.topk(logp, top_n)
                top = list(zip(ti.tolist(), tv.tolist()))
            return float(logp[tok]), top

    def _count(self, gen):
        gen.generated += 1
        self.stats["generated_tokens"] += 1
        if gen.first_token is None:
            gen.first_token = time.perf_counter()
            self.ttft.observe(gen.first_token - gen.submitted)

    # ---- one decode step of the batch ------------------------------------------------------------------------------
    def _step(self):
        """One decode step for every slot that has its next input. Returns False if no row could run."""
        # 1) rows whose tool call returned take their next token (from the logits they held)
        for g in self.slots:
            if g is not None and g.next_input is None and g.tool_future is not None and g.tool_future.done():
                self._choose(g, g.held_logits)
        busy = [i for i, g in enumerate(self.slots) if g is not None]
        if not busy:
            return False
        hi = busy[-1] + 1
        ready = [i for i in busy if self.slots[i].next_input is not None]
        if not ready:
            return False
        # 2) decode rows [0, hi) at their own positions; idle rows get a dummy token, overwritten before it is read
        t0 = time.perf_counter()
        ids = [self.slots[i].next_input if i in ready else 0 for i in range(hi)]
        with torch.inference_mode():
            logits = self.engine.decode(ids, self.cache, self.cache.lens[:hi])
            greedy = logits.argmax(-1).tolist() if any(
                (self.slots[i].request.temperature or 0) <= 0 for i in ready) else None
        for i in ready:
            self.cache.lens[i] += 1
        # 3) each ready row takes its next token
        for i in ready:
            gen = self.slots[i]
            if gen is None:
                continue
            if gen.cancelled:
                self._finish(gen, "cancelled")
            else:
                self._choose(gen, logits[i], greedy[i] if greedy is not None else None)
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - t0
        return True
