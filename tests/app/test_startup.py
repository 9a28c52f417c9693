"""Start-up phases cut at vLLM's own log lines (copied from a real start of vLLM 0.32 on this CPU,
with and without torch.compile), on a clock the test moves."""

from app.startup import PHASES, StartupClock

# One start of the tiny model without --enforce-eager, the lines that end each phase.
COMPILED = [
    "(EngineCore pid=23428) INFO 11-29 10:10:56 [default_loader.py:501] Loading weights took 0.01 seconds",
    "(EngineCore pid=23428) INFO 11-29 10:10:57 [cpu_model_runner.py:87] Warming up model for the compilation...",
    "(EngineCore pid=23428) INFO 11-29 10:12:15 [decorators.py:743] [backbone] saved AOT compiled function to "
    "/cache/torch_compile_cache/torch_aot_compile/c917/rank_0_0/model",
    "(EngineCore pid=23428) INFO 11-29 10:12:19 [core.py:402] init engine (profile, create kv cache, warmup model) "
    "took 81.75 s",
    "(APIServer pid=19747) INFO 11-29 10:12:20 [entry.py:140] Starting vLLM server on http://0.0.0.0:18232",
]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def run(lines_at: list[tuple[float, str]], ready_at: float, failed_first: float | None = None) -> dict:
    now = Clock()
    clock = StartupClock(now)
    with clock.phase("gpu_check"):
        now.t += 0.5
    with clock.phase("preflight"):
        now.t += 1.5
    with clock.phase("download"):
        now.t += 10
    if failed_first is not None:
        clock.engine_launched()
        now.t += failed_first
        clock.engine_failed()
    clock.engine_launched()
    start = now.t
    for at, line in lines_at:
        now.t = start + at
        clock.engine_line(line)
    now.t = start + ready_at
    clock.engine_ready()
    return clock.as_dict()


def test_engine_phases_are_cut_at_vllms_lines():
    phases = run(
        [(20, COMPILED[0]), (21, COMPILED[1]), (99, COMPILED[2]), (103, COMPILED[3]), (104, COMPILED[4])], 105
    )
    assert phases == {
        "gpu_check": 0.5,
        "preflight": 1.5,
        "download": 10.0,
        "engine_load": 20.0,
        "compile": 79.0,
        "warmup": 4.0,
        "ready": 2.0,
        "total": 117.0,
    }
    assert set(phases) - {"total"} <= set(PHASES)


def test_without_compile_lines_its_time_is_in_the_next_phase_and_it_is_not_reported():
    phases = run([(20, COMPILED[0]), (25, COMPILED[3])], 27)
    assert (phases["engine_load"], phases["warmup"], phases["ready"]) == (20.0, 5.0, 2.0)
    assert "compile" not in phases
    # An engine that prints none of them: all of it is "ready".
    assert run([], 30)["ready"] == 30.0


def test_a_failed_attempt_is_its_own_phase_and_the_retry_is_timed_afresh():
    phases = run([(20, COMPILED[0]), (25, COMPILED[3])], 27, failed_first=40)
    assert phases["failed_start"] == 40.0 and phases["engine_load"] == 20.0
    assert phases["total"] == 0.5 + 1.5 + 10 + 40 + 27


def test_lines_before_a_launch_are_ignored():
    clock = StartupClock(Clock())
    clock.engine_line(COMPILED[0])
    assert clock._marks == {}
