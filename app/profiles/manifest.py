"""The profile manifest: `profiles/models.yaml` (baked into the image) and PROFILES_FILE, each
checked against `profiles/schema.json` when read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = ROOT / "profiles" / "models.yaml"
SCHEMA = ROOT / "profiles" / "schema.json"


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Needs:
    gpu_count: int
    gpu_memory_gb: float | None = None
    compute_capability: str | None = None


@dataclass(frozen=True)
class Profile:
    id: str
    engine: str
    precision: str
    values: dict[str, Any]
    """The profile's engine values as written (tensor_parallel_size, limits, extra_args, ...)."""
    needs: Needs
    match: str
    """How it matched the model: `id` or `family`."""
    source: str = field(default="", compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


@dataclass(frozen=True)
class Entry:
    ids: tuple[str, ...]
    architectures: tuple[str, ...]
    profiles: tuple[dict[str, Any], ...]
    source: str


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


def _validate(doc: Any, source: str) -> None:
    from jsonschema import Draft202012Validator

    errors = sorted(Draft202012Validator(schema()).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top)"
        raise ManifestError(f"{source}: {where}: {first.message}")


def read(path: Path) -> list[Entry]:
    """The entries of one manifest file, validated."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(f"{path}: not valid YAML{where}: {problem}") from exc
    _validate(doc, str(path))
    return [
        Entry(
            ids=tuple(m.get("ids", ())),
            architectures=tuple(m.get("architectures", ())),
            profiles=tuple(m["profiles"]),
            source=str(path),
        )
        for m in doc["models"]
    ]


def load(user_file: Path | None = None, builtin: Path = BUILTIN) -> list[Entry]:
    """The user's entries first (they win), then the built-in ones. A profile id appears once: a
    user's profile replaces a built-in one of the same id."""
    entries = (read(user_file) if user_file else []) + read(builtin)
    seen: set[str] = set()
    out = []
    for entry in entries:
        kept = tuple(p for p in entry.profiles if p["id"] not in seen)
        seen.update(p["id"] for p in kept)
        if kept:
            out.append(Entry(entry.ids, entry.architectures, kept, entry.source))
    return out


def as_profile(raw: dict[str, Any], match: str, source: str) -> Profile:
    """A profile as written in a manifest entry, with how it matched the model."""
    needs = raw["needs"]
    return Profile(
        id=raw["id"],
        engine=raw["engine"],
        precision=raw["precision"],
        values={k: v for k, v in raw.items() if k not in ("id", "engine", "precision", "needs", "notes")},
        needs=Needs(
            gpu_count=needs["gpu_count"],
            gpu_memory_gb=needs.get("gpu_memory_gb"),
            compute_capability=needs.get("compute_capability"),
        ),
        match=match,
        source=source,
    )


def profiles_for(
    entries: list[Entry], model_id: str | None, architectures: list[str] | None
) -> list[Profile]:
    """The profiles that apply to a model, best first: those of its Hub id, then its family's."""
    wanted = (model_id or "").lower()
    by_id = [
        as_profile(raw, "id", e.source)
        for e in entries
        if wanted and wanted in (i.lower() for i in e.ids)
        for raw in e.profiles
    ]
    archs = set(architectures or ())
    by_family = [
        as_profile(raw, "family", e.source)
        for e in entries
        if archs & set(e.architectures)
        for raw in e.profiles
    ]
    return by_id + by_family


def all_ids(entries: list[Entry]) -> list[str]:
    return [p["id"] for e in entries for p in e.profiles]
