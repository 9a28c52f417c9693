"""Model profiles and hardware-aware defaults.

    python -m app.profiles list [--model M] [--gpus auto|8xH100-80GB|1xL4-24GB] [--json]

At start-up (`choose`), MODEL_PROFILE picks the configuration the engine gets: `auto` the first
profile of the manifest that runs on the GPUs found, else defaults computed from the model's config
and the GPUs; an id forces that profile; `none` applies nothing. What the user set wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.profiles import manifest
from app.profiles.hardware import GpuSet
from app.profiles.model_facts import ModelFacts
from app.profiles.select import (
    ENGINE_SETTINGS,
    INCOMPATIBLE,
    LOW_MEMORY,
    Candidate,
    Planner,
    apply,
    auto_choice,
    candidates,
)


@dataclass
class Choice:
    settings: Any
    """The settings the engine is started with."""
    report: dict[str, Any]
    """For /info and the log: the profile chosen (or none, and why), applied and overridden values."""
    candidates: list[Candidate] = field(default_factory=list)
    error: str | None = None
    """One sentence: the start cannot go on (a forced profile that cannot run, a bad manifest)."""
    warning: str | None = None


def user_overrides(settings: Any, user_set: set[str]) -> dict[str, Any]:
    """The engine settings the user set, by name."""
    return {name: getattr(settings, name) for name in ENGINE_SETTINGS if name in user_set}


def choose(
    settings: Any,
    gpus: GpuSet,
    facts: ModelFacts | None,
    user_set: set[str],
    model_id: str | None = None,
) -> Choice:
    mode = settings.MODEL_PROFILE
    base = {"mode": mode, "id": None, "applied": {}, "overridden": {}}
    if mode == "none":
        return Choice(settings, {**base, "reason": "MODEL_PROFILE=none: the settings as given"})
    try:
        entries = manifest.load(settings.PROFILES_FILE)
    except manifest.ManifestError as exc:
        return Choice(settings, base, error=f"The profile manifest cannot be used: {exc}.")
    overrides = user_overrides(settings, user_set)
    archs = facts.architectures if facts else None

    if mode == "auto":
        if settings.DEVICE == "cpu" or gpus.count == 0:
            reason = "DEVICE=cpu" if settings.DEVICE == "cpu" else "no GPU"
            return Choice(
                settings, {**base, "reason": f"{reason}: profiles and computed defaults are for GPUs"}
            )
        cands = candidates(
            manifest.profiles_for(entries, model_id, archs), facts, gpus, settings.ENGINE, overrides
        )
        chosen = auto_choice(cands)
        if chosen is None:
            why = "no profile runs here" if cands else "no profile for this model"
            if facts is None:
                why += " and the model's config.json could not be read to compute defaults"
            return Choice(settings, {**base, "reason": f"{why}: the engine's own defaults"}, cands)
        new, report = apply(settings, chosen, user_set)
        return Choice(new, {**base, **report}, cands)

    profile = next(
        (p for p in manifest.profiles_for(entries, model_id, archs) if p.id == mode),
        None,
    ) or next(
        (
            manifest.as_profile(raw, "forced", e.source)
            for e in entries
            for raw in e.profiles
            if raw["id"] == mode
        ),
        None,
    )
    if profile is None:
        known = [p.id for p in manifest.profiles_for(entries, model_id, archs)] or manifest.all_ids(entries)
        return Choice(
            settings,
            base,
            error=f"MODEL_PROFILE={mode} is not in the manifest; profiles for this model: {', '.join(known)}.",
        )
    cand = Planner(facts, gpus, settings.ENGINE, overrides).evaluate(profile)
    if cand.group == INCOMPATIBLE:
        return Choice(settings, base, [cand], error=f"Profile {mode} cannot run here: {cand.reason}.")
    new, report = apply(settings, cand, user_set)
    warning = f"profile {mode} may not fit: {cand.reason}" if cand.group == LOW_MEMORY else None
    return Choice(new, {**base, **report}, [cand], warning=warning)


__all__ = ["Choice", "choose", "user_overrides"]
