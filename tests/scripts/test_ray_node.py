"""scripts/ray_node.py, the Helm chart's multi-node entry point: the Ray commands, the wait against a
deadline, and what each role runs at the end. Ray itself is not installed here (the GPU image has
it): the commands are checked as argv and the Ray cluster is stood in for by a counter."""

from __future__ import annotations

import pytest

from scripts import ray_node


def test_the_ray_commands():
    assert ray_node.head_command(6379) == ["ray", "start", "--head", "--port=6379", "--disable-usage-stats"]
    assert ray_node.worker_command("10.0.0.5", 6380) == [
        "ray",
        "start",
        "--address=10.0.0.5:6380",
        "--block",
        "--disable-usage-stats",
    ]


def test_wait_for_polls_until_ready_and_gives_up_at_the_deadline():
    calls = []
    ray_node.wait_for(lambda: len(calls) >= 3, timeout=60, what="x", sleep=calls.append)
    assert len(calls) == 3
    with pytest.raises(TimeoutError, match="2 Ray nodes: not within 0 s"):
        ray_node.wait_for(lambda: False, timeout=0, what="2 Ray nodes", sleep=lambda _: None)


def test_the_leader_starts_the_head_waits_for_the_group_then_execs_the_stack(monkeypatch):
    ran, execs, nodes = [], [], iter([1, 1, 2])
    monkeypatch.setattr(ray_node.subprocess, "run", lambda argv, check: ran.append(argv))
    monkeypatch.setattr(ray_node, "alive_nodes", lambda: next(nodes))
    monkeypatch.setattr(ray_node.time, "sleep", lambda _: None)
    code = ray_node.main(["leader", "--nodes", "2"], execv=lambda path, argv: execs.append((path, argv)))
    assert code == 0
    assert ran == [ray_node.head_command(6379)]
    assert execs == [(str(ray_node.START), [str(ray_node.START)])]
    assert ray_node.START.name == "start.sh" and ray_node.START.exists()


def test_a_worker_waits_for_the_head_then_becomes_a_ray_worker(monkeypatch):
    execs, up = [], iter([False, True])
    monkeypatch.setattr(ray_node, "listening", lambda host, port: next(up))
    monkeypatch.setattr(ray_node.time, "sleep", lambda _: None)
    monkeypatch.setattr(ray_node, "_which", lambda name: f"/usr/bin/{name}")
    code = ray_node.main(["worker", "--leader", "lead"], execv=lambda path, argv: execs.append((path, argv)))
    assert code == 0 and execs == [("/usr/bin/ray", ray_node.worker_command("lead", 6379))]


def test_a_group_that_never_forms_fails_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(ray_node.subprocess, "run", lambda argv, check: None)
    monkeypatch.setattr(ray_node, "alive_nodes", lambda: 1)
    assert ray_node.main(["leader", "--nodes", "2", "--timeout", "0"], execv=lambda *a: None) == 1
    assert "ray_node: 2 Ray nodes: not within 0 s" in capsys.readouterr().err
