"""What the launcher and the proxy need to know about an engine."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

# Flags whose value is a secret, masked wherever a command is shown (/info, logs).
SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "--token", "--ssl-keyfile-password"})
MASK = "***"


@dataclass(frozen=True)
class Engine:
    name: str
    build_command: Callable[..., list[str]] | None
    """(settings, model_path) -> argv. Pure: no I/O, same settings give the same argv. None for an
    engine the launcher does not start (ENGINE=external)."""
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    version_path: str | None = "/version"
    metrics_prefix: bytes = b"vllm:"
    config_files: Callable[..., dict[str, str]] | None = None
    """(settings) -> {path: text}: files the launcher writes before it starts the engine (for
    options an engine takes only from a file). Pure, like build_command."""
    unmapped: Callable[..., list[str]] | None = None
    """(settings) -> the settings that are set but that this engine has no equivalent for: the
    launcher names them once at start-up instead of dropping them silently."""

    def select_metrics(self, text: bytes) -> bytes:
        """The engine's own metric families from its exposition text (its process_* and python_*
        families would clash with the proxy's)."""
        keep: list[bytes] = []
        for line in text.splitlines(keepends=True):
            if line.startswith(b"#"):
                parts = line.split(b" ", 3)
                if len(parts) >= 3 and parts[2].startswith(self.metrics_prefix):
                    keep.append(line)
            elif line.startswith(self.metrics_prefix):
                keep.append(line)
        return b"".join(keep)


def split_extra_args(extra: str) -> list[str]:
    """ENGINE_EXTRA_ARGS as argv words, split the way a POSIX shell would."""
    return shlex.split(extra) if extra.strip() else []


def mask_secrets(argv: list[str]) -> list[str]:
    """A copy of argv safe to show: values of secret flags replaced (`--flag v` and `--flag=v`)."""
    out: list[str] = []
    hide_next = False
    for word in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = word.partition("=")
        if flag in SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(word)
                hide_next = True
            continue
        out.append(word)
    return out
