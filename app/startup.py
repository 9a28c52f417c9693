"""Where a cold start's time goes: the launcher's own phases (GPU check, preflight, download) timed
directly, and the engine's (weights loaded, compiled, warmed up, serving) cut at the lines vLLM
prints when each ends:

    engine_load  launch -> `Loading weights took` / `Model loading took` (interpreter start, config,
                 weights)
    compile      -> the last torch.compile line (`torch.compile took`, `saved AOT compiled function`,
                 `Directly load AOT compilation`, `Compiling a graph`, `Directly load the compiled graph`)
    warmup       -> `init engine (profile, create kv cache, warmup model) took` (memory profiling,
                 KV cache, CUDA graphs)
    ready        -> the engine's /health answers 200 (its API server, tokenizer, chat template)

A phase whose line never came (no compile with --enforce-eager, an engine that prints none of them)
is not reported; its time is counted in the next phase that is. A failed first attempt of the
engine (retried) is `failed_start`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PHASES = ("gpu_check", "preflight", "download", "engine_load", "compile", "warmup", "ready", "failed_start")
"""Every phase label the metric can carry (plus `total`)."""
ENGINE_MARKERS = (
    ("engine_load", re.compile(r"Loading weights took|Model loading took")),
    (
        "compile",
        re.compile(
            r"torch\.compile took|torch\.compile and initial profiling|saved AOT compiled function|"
            r"Directly load AOT compilation|Compiling a graph for|Directly load the compiled graph"
        ),
    ),
    ("warmup", re.compile(r"init engine \(profile, create kv cache, warmup model\) took")),
)


class StartupClock:
    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._t0 = now()
        self.durations: dict[str, float] = {}
        self._engine_t0: float | None = None
        self._marks: dict[str, float] = {}
        self.total: float | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.durations[name] = self.durations.get(name, 0.0) + self._now() - start

    def engine_launched(self) -> None:
        self._engine_t0 = self._now()
        self._marks = {}

    def engine_line(self, line: str) -> None:
        if self._engine_t0 is None:
            return
        for phase, pattern in ENGINE_MARKERS:
            if pattern.search(line):
                self._marks[phase] = self._now()  # the last one counts (several ranks, several graphs)

    def engine_failed(self) -> None:
        """The attempt under way failed and will be retried."""
        if self._engine_t0 is not None:
            self.durations["failed_start"] = (
                self.durations.get("failed_start", 0.0) + self._now() - self._engine_t0
            )
        self._engine_t0 = None

    def engine_ready(self) -> None:
        now = self._now()
        t = self._engine_t0 if self._engine_t0 is not None else now
        for phase, _ in ENGINE_MARKERS:
            mark = self._marks.get(phase)
            if mark is not None and mark >= t:
                self.durations[phase] = mark - t
                t = mark
        self.durations["ready"] = now - t
        self.total = now - self._t0

    def as_dict(self) -> dict[str, float]:
        out = {name: round(self.durations[name], 3) for name in PHASES if name in self.durations}
        if self.total is not None:
            out["total"] = round(self.total, 3)
        return out
