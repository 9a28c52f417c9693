"""Running a load test: the schedule, the concurrency limit, rounds, and two sides interleaved.

A run is a sequence of blocks. A block is a list of requests with arrival offsets (a Poisson process
at `--qps`, or all at once), started in order as the concurrency limit allows, and it ends when all
its requests have. The server's `/metrics` is read before and after each block, so the prefix-cache
counters' deltas belong to it. `--duration`: no request starts after it; with `--compare` and in
multi-round mode it is checked between blocks instead (what starts runs whole, on both sides).

- single-turn: one block of every request (with `--compare`: blocks of `--compare-block` requests);
- multi-round: one block per round, every user's next question; round r+1 starts when round r has
  ended, so each round's TTFT and hit rate are its own;
- `--compare URL2`: each block runs against both URLs, one after the other, in the order A B, B A,
  A B, ... so drift over the run falls on both. Both get the same prompts, questions and arrival
  offsets; each prompt opens with a tag naming the run and the side, so that one side's requests
  cannot warm the prefix cache for the other when both reach the same engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from app.loadtest import workload
from app.loadtest.client import Client, Result
from app.loadtest.options import Options
from app.loadtest.stats import add_deltas, aggregate, metrics_delta, ratios

DEFAULT_USERS = 4
DEFAULT_ROUNDS = 3
DEFAULT_RANDOM_PROMPTS = 1000
FALLBACK_TOKENS_PER_WORD = 1.3  # when the server has no /tokenize to measure with


@dataclass
class Round:
    number: int
    results: list[Result] = field(default_factory=list)
    duration_s: float = 0.0
    engine: dict[str, float] | None = None


@dataclass
class Side:
    name: str
    url: str
    client: Client
    metrics_url: str | None
    tag: str = ""
    results: list[Result] = field(default_factory=list)
    duration_s: float = 0.0
    engine: dict[str, float] | None = None
    rounds: list[Round] = field(default_factory=list)
    conversations: list[workload.Conversation] = field(default_factory=list)

    async def scrape(self) -> dict[str, float] | None:
        return await self.client.scrape(self.metrics_url) if self.metrics_url else None


@dataclass
class Item:
    """One request to make, before it is addressed to a side."""

    id: str
    messages: Callable[[Side], list[dict[str, str]]]
    max_tokens: int
    user: int | None = None
    round: int | None = None


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, enabled: bool, total: int | None, duration: float | None) -> None:
        self.enabled = enabled
        self.total = total
        self.duration = duration
        self.done = self.failed = 0
        self.start = time.monotonic()
        self._drawn = 0.0

    def update(self, result: Result) -> None:
        self.done += 1
        self.failed += not result.ok
        if self.enabled and (time.monotonic() - self._drawn > 0.1 or self.done == self.total):
            self.draw()

    def draw(self) -> None:
        self._drawn = now = time.monotonic()
        elapsed = now - self.start
        if self.total:
            share = self.done / self.total
        elif self.duration:
            share = min(elapsed / self.duration, 1.0)
        else:
            share = 0.0
        bar = "#" * int(share * 30)
        total = f"/{self.total}" if self.total else ""
        sys.stderr.write(
            f"\r[{bar:<30}] {self.done}{total} requests, {self.failed} failed, {elapsed:6.1f} s "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.draw()
            sys.stderr.write("\n")
            sys.stderr.flush()


class Run:
    def __init__(self, opts: Options, session: aiohttp.ClientSession) -> None:
        self.opts = opts
        self.run_id = uuid.uuid4().hex[:8]
        self.rng = random.Random(opts.seed)
        self.multi_round = opts.multi_round
        self.users = opts.users or DEFAULT_USERS
        self.rounds = opts.rounds or DEFAULT_ROUNDS
        self.concurrency = opts.concurrency or (self.users if self.multi_round else 1)
        urls = [opts.server_url] + ([opts.compare] if opts.compare else [])
        self.sides = [
            Side(
                name,
                url.rstrip("/"),
                Client(session, url, opts.api_key, opts.timeout),
                self._metrics_url(url, i),
                tag=f"[{self.run_id}-{name}] " if opts.compare else "",
            )
            for i, (name, url) in enumerate(zip("ab", urls, strict=False))
        ]
        self.model = opts.model or ""
        self.tokens_per_word: float | None = None
        self.notes: list[str] = []
        self.progress: Progress | None = None
        self.prompts_cache: list[str] = []
        self.started = 0.0
        self.deadline: float | None = None

    def _metrics_url(self, url: str, index: int) -> str | None:
        given = self.opts.metrics_url
        if given and given.lower() == "off":
            return None
        if given and index == 0:
            return given
        return url.rstrip("/") + "/metrics"

    # --- set-up -------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Resolve the model and, for random text, how many words make a token count."""
        if not self.model:
            self.model = (await self.sides[0].client.models())[0]
        if self.multi_round or self.opts.random_input_len:
            sample = workload.random_words(random.Random(0), 400)
            count = await self.sides[0].client.count_tokens(self.model, sample)
            if count:
                self.tokens_per_word = count / 400
            else:
                self.tokens_per_word = FALLBACK_TOKENS_PER_WORD
                self.notes.append(
                    f"the server has no /tokenize: random text assumes {FALLBACK_TOKENS_PER_WORD} tokens a word"
                )
        if not self.multi_round:
            self.prompts_cache = self.prompts()

    def _words(self, tokens: int) -> str:
        assert self.tokens_per_word is not None
        return workload.random_words(self.rng, workload.words_for_tokens(tokens, self.tokens_per_word))

    def prompts(self) -> list[str]:
        opts = self.opts
        if opts.random_input_len:
            n = opts.num_prompts or opts.num_requests or DEFAULT_RANDOM_PROMPTS
            return [self._words(opts.random_input_len) for _ in range(n)]
        if opts.prompts_file:
            found = workload.read_prompts_file(opts.prompts_file)
        elif opts.prompts:
            found = [p for p in opts.prompts if p.strip()]
        else:
            n = opts.num_prompts or 10
            return list(itertools.islice(itertools.cycle(workload.BUILTIN_PROMPTS), n))
        return found[: opts.num_prompts] if opts.num_prompts else found

    # --- running ------------------------------------------------------------------------------

    def body(self, item: Item, side: Side) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": item.messages(side),
            "max_tokens": item.max_tokens,
            "temperature": self.opts.temperature,
            "stream": self.opts.stream,
        }
        if self.opts.stream:
            body["stream_options"] = {"include_usage": True}
        if self.opts.ignore_eos:
            body["ignore_eos"] = True
        if self.opts.extra_body:
            body.update(self.opts.extra_body)
        return body

    async def _one(self, side: Side, item: Item, slot: asyncio.Semaphore) -> Result:
        try:
            result = Result(
                id=item.id,
                request_id=f"lt-{self.run_id}-{side.name}-{item.id}",
                side=side.name,
                user=item.user,
                round=item.round,
                start_s=time.perf_counter() - self.started,
            )
            await side.client.chat(self.body(item, side), result)
        finally:
            slot.release()
        if self.progress is not None:
            self.progress.update(result)
        return result

    async def block(
        self, side: Side, items: Iterable[Item], arrivals: Iterable[float]
    ) -> tuple[list[Result], float, dict[str, float] | None]:
        """Start `items` at their `arrivals` (offsets from now) within the concurrency limit and
        the deadline; wait for all. Returns the results, the block's wall time and the deltas of
        the engine's counters over it."""
        before = await side.scrape()
        slot = asyncio.Semaphore(self.concurrency)
        tasks: list[asyncio.Task[Result]] = []
        start = time.perf_counter()
        for item, at in zip(items, arrivals, strict=False):
            delay = start + at - time.perf_counter()
            if self.deadline is not None and time.perf_counter() + max(delay, 0.0) >= self.deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            await slot.acquire()
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                slot.release()
                break
            tasks.append(asyncio.create_task(self._one(side, item, slot)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        return results, duration, metrics_delta(before, await side.scrape())

    def _record(
        self, side: Side, results: list[Result], duration: float, delta: dict[str, float] | None
    ) -> None:
        side.results += results
        side.duration_s += duration
        side.engine = add_deltas(side.engine, delta)

    @contextlib.contextmanager
    def _whole(self) -> Iterator[None]:
        """No deadline inside: what starts here runs to its end."""
        saved, self.deadline = self.deadline, None
        try:
            yield
        finally:
            self.deadline = saved

    def _order(self, k: int) -> list[Side]:
        return self.sides if k % 2 == 0 else self.sides[::-1]

    async def run(self) -> None:
        opts = self.opts
        self.started = time.perf_counter()
        self.deadline = self.started + opts.duration if opts.duration else None
        if self.multi_round:
            total = self.users * self.rounds * len(self.sides)
        elif opts.num_requests or not opts.duration:
            total = (opts.num_requests or len(self.prompts_cache)) * len(self.sides)
        else:
            total = None
        show = opts.progress if opts.progress is not None else sys.stderr.isatty()
        self.progress = Progress(show, total, opts.duration)
        try:
            await (self._multi_round() if self.multi_round else self._single())
        finally:
            self.progress.close()
        if not opts.stream:
            self.notes.append("no stream: TTFT and TPOT are not measured")
        for side in self.sides:
            if side.metrics_url and side.engine is None:
                self.notes.append(f"no vLLM prefix-cache counters at {side.metrics_url}: no hit rate")

    def _items(self) -> Iterator[Item]:
        prompts = self.prompts_cache
        limit = self.opts.num_requests or (None if self.opts.duration else len(prompts))
        for i in itertools.islice(itertools.count(), limit):
            prompt = prompts[i % len(prompts)]
            yield Item(
                id=f"{i:06d}",
                messages=lambda side, p=prompt: [{"role": "user", "content": side.tag + p}],
                max_tokens=self.opts.max_tokens,
            )

    def _arrivals(self) -> Iterator[float]:
        if self.opts.qps is None:
            return itertools.repeat(0.0)
        rng, qps = self.rng, self.opts.qps
        return itertools.accumulate((rng.expovariate(qps) for _ in itertools.count()), initial=0.0)

    async def _single(self) -> None:
        items = self._items()
        if len(self.sides) == 1:
            self._record(self.sides[0], *await self.block(self.sides[0], items, self._arrivals()))
            return
        size = self.opts.compare_block or max(8, 2 * self.concurrency)
        for k in itertools.count():
            chunk = list(itertools.islice(items, size))
            if not chunk:
                break
            arrivals = list(itertools.islice(self._arrivals(), len(chunk)))
            with self._whole():  # both sides get the same block: --duration is checked between them
                for side in self._order(k):
                    self._record(side, *await self.block(side, chunk, arrivals))
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                break

    async def _multi_round(self) -> None:
        opts = self.opts
        system = self._words(opts.system_prompt_tokens) if opts.system_prompt_tokens else None
        for side in self.sides:
            side.conversations = [workload.Conversation(system, opts.history) for _ in range(self.users)]
        for number in range(1, self.rounds + 1):
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                break
            questions = [self._words(opts.question_len) for _ in range(self.users)]
            arrivals = list(itertools.islice(self._arrivals(), self.users))
            items = [
                Item(
                    id=f"u{user:03d}-r{number:03d}",
                    messages=lambda side, u=user, q=question: side.conversations[u].messages(q, side.tag),
                    max_tokens=opts.answer_len,
                    user=user,
                    round=number,
                )
                for user, question in enumerate(questions)
            ]
            with self._whole():  # a round, once started, runs whole
                for side in self._order(number - 1):
                    results, duration, delta = await self.block(side, items, arrivals)
                    self._record(side, results, duration, delta)
                    side.rounds.append(Round(number, results, duration, delta))
                    for result in results:
                        if result.ok:
                            side.conversations[result.user].answered(questions[result.user], result.text)

    # --- the report ---------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        def side_report(side: Side) -> dict[str, Any]:
            out: dict[str, Any] = {
                "url": side.url,
                "summary": aggregate(side.results, side.duration_s, side.engine),
            }
            if self.multi_round:
                out["rounds"] = [
                    {"round": r.number, **aggregate(r.results, r.duration_s, r.engine)} for r in side.rounds
                ]
            return out

        a = side_report(self.sides[0])
        report: dict[str, Any] = {
            "tool": "python -m app.loadtest",
            "run_id": self.run_id,
            "model": self.model,
            "mode": "multi-round" if self.multi_round else "single-turn",
            "concurrency": self.concurrency,
            "options": self.opts.safe_dump(),
            "notes": self.notes,
            **a,
        }
        if self.multi_round:
            report["users"], report["rounds_run"] = self.users, len(self.sides[0].rounds)
        if len(self.sides) > 1:
            b = side_report(self.sides[1])
            b["ratios"] = ratios(a["summary"], b["summary"])
            report["compare"] = b
        if self.opts.save_requests:
            everything = [r for side in self.sides for r in side.results]
            report["requests"] = [r.to_json() for r in sorted(everything, key=lambda r: (r.start_s, r.side))]
        return report


async def execute(opts: Options) -> dict[str, Any]:
    """Run the load test the options describe; returns the report (see Run.report)."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        run = Run(opts, session)
        await run.prepare()
        await run.run()
        return run.report()
