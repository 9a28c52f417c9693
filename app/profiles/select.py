"""Which configuration a model gets on a set of GPUs: every profile that applies, judged runnable,
short on memory or incompatible (and why), plus the computed hardware-aware defaults; the first
runnable one is what MODEL_PROFILE=auto takes. Then how the chosen one becomes settings, with
whatever the user set winning."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from app.profiles.hardware import GpuSet
from app.profiles.manifest import Profile
from app.profiles.model_facts import ModelFacts
from app.profiles.sizing import (
    CONTEXT_STEP,
    MIN_CONTEXT,
    Plan,
    choose_tp,
    compatibility,
    plan,
    valid_tp,
)

RUNNABLE, LOW_MEMORY, INCOMPATIBLE = "runnable", "low_memory", "incompatible"
GROUP_ORDER = {RUNNABLE: 0, LOW_MEMORY: 1, INCOMPATIBLE: 2}

# A profile's keys and the settings they become.
PROFILE_SETTINGS = {
    "dtype": "DTYPE",
    "quantization": "QUANTIZATION",
    "tensor_parallel_size": "TENSOR_PARALLEL_SIZE",
    "pipeline_parallel_size": "PIPELINE_PARALLEL_SIZE",
    "max_model_len": "MAX_MODEL_LEN",
    "gpu_memory_utilization": "GPU_MEMORY_UTIL",
    "max_num_seqs": "MAX_NUM_SEQS",
    "max_num_batched_tokens": "MAX_BATCHED_TOKENS",
    "kv_cache_dtype": "KV_CACHE_DTYPE",
    "enable_prefix_caching": "ENABLE_PREFIX_CACHING",
    "enable_chunked_prefill": "ENABLE_CHUNKED_PREFILL",
    "trust_remote_code": "TRUST_REMOTE_CODE",
}
LIMIT_SETTINGS = {"image": "IMAGE_LIMIT", "video": "VIDEO_LIMIT", "audio": "AUDIO_LIMIT"}
ENGINE_SETTINGS = (*PROFILE_SETTINGS.values(), *LIMIT_SETTINGS.values(), "ENGINE_EXTRA_ARGS")
"""The settings a profile can provide: a user's value for any of them wins."""


def profile_settings(profile: Profile) -> dict[str, Any]:
    """The settings a profile provides, by setting name (extra_args as ENGINE_EXTRA_ARGS words)."""
    out = {setting: profile.values[key] for key, setting in PROFILE_SETTINGS.items() if key in profile.values}
    for kind, setting in LIMIT_SETTINGS.items():
        if kind in profile.get("limits", {}):
            out[setting] = profile.values["limits"][kind]
    if profile.get("extra_args"):
        out["ENGINE_EXTRA_ARGS"] = shlex.join(profile.values["extra_args"])
    return out


@dataclass
class Candidate:
    group: str
    profile: str | None
    """The profile's id; None for the computed hardware-aware defaults."""
    match: str
    """`id`, `family` (the manifest matched the model by id or architecture) or `computed`."""
    tensor_parallel_size: int | None
    pipeline_parallel_size: int
    max_model_len: int | None
    gb_per_gpu: float | None
    reason: str
    fits_max_model_len: int | None = None
    """Short on memory: the context that would fit."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What it sets, by setting name."""
    plan: Plan | None = None
    tried: list[Plan] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "profile": self.profile,
            "match": self.match,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "max_model_len": self.max_model_len,
            "gb_per_gpu": self.gb_per_gpu,
            "reason": self.reason,
            "fits_max_model_len": self.fits_max_model_len,
            "settings": self.settings,
            "arithmetic": self.plan.arithmetic() if self.plan else None,
        }


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _fits_len(p: Plan, facts: ModelFacts) -> int:
    tokens = min(p.fits_tokens, facts.max_model_len)
    return tokens if tokens == facts.max_model_len else tokens // CONTEXT_STEP * CONTEXT_STEP


class Planner:
    """Judges configurations of one model (facts may be None: then only what profiles declare
    is checked) on one set of GPUs, for one engine, with the user's own engine settings."""

    def __init__(
        self,
        facts: ModelFacts | None,
        gpus: GpuSet,
        engine: str = "vllm",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.facts = facts
        self.gpus = gpus
        self.engine = engine
        self.overrides = dict(overrides or {})

    def _plan_kwargs(self, eff: dict[str, Any]) -> dict[str, Any]:
        return {
            "gpu_memory_utilization": eff.get("GPU_MEMORY_UTIL"),
            "dtype": eff.get("DTYPE"),
            "quantization": eff.get("QUANTIZATION"),
            "kv_cache_dtype": eff.get("KV_CACHE_DTYPE"),
            "max_num_seqs": eff.get("MAX_NUM_SEQS"),
            "max_batched_tokens": eff.get("MAX_BATCHED_TOKENS"),
            "enforce_eager": "--enforce-eager" in shlex.split(eff.get("ENGINE_EXTRA_ARGS") or ""),
        }

    def _short(self, p: Plan, need_len: int) -> str:
        have = _gb(self.gpus.memory_bytes)
        fits = _fits_len(p, self.facts) if self.facts else 0
        return (
            f"a {need_len}-token context needs {p.gb_per_gpu} GB per GPU at tp={p.tensor_parallel_size}; "
            f"the {self.gpus.name} has {have}: {fits} tokens would fit"
        )

    def _no_room(self, p: Plan) -> str:
        return (
            f"the weights ({_gb(p.weights_bytes)} per GPU at tp={p.tensor_parallel_size}) and the "
            f"{_gb(p.allowance_bytes)} allowance leave no room for a KV cache in the {self.gpus.name}'s "
            f"{_gb(p.budget_bytes)} budget"
        )

    def evaluate(self, profile: Profile) -> Candidate:
        own = profile_settings(profile)
        eff = {**own, **self.overrides}
        if "ENGINE_EXTRA_ARGS" in own and "ENGINE_EXTRA_ARGS" in self.overrides:
            eff["ENGINE_EXTRA_ARGS"] = f"{own['ENGINE_EXTRA_ARGS']} {self.overrides['ENGINE_EXTRA_ARGS']}"
        tp, pp = eff.get("TENSOR_PARALLEL_SIZE"), eff.get("PIPELINE_PARALLEL_SIZE") or 1
        length = eff.get("MAX_MODEL_LEN")
        cand = Candidate(
            INCOMPATIBLE, profile.id, profile.match, tp, pp, length, profile.needs.gpu_memory_gb, ""
        )
        cand.settings = own

        gpus_needed = max(profile.needs.gpu_count, (tp or 1) * pp)
        why = None
        if profile.engine != self.engine:
            why = f"a profile for ENGINE={profile.engine} (this is ENGINE={self.engine})"
        elif self.gpus.count == 0:
            why = f"needs {gpus_needed} GPU{'s' if gpus_needed > 1 else ''}; none found"
        elif gpus_needed > self.gpus.count:
            why = f"needs {gpus_needed} GPUs; {self.gpus.count} found"
        elif (cc := profile.needs.compute_capability) and self.gpus.capability_at_least(cc) is False:
            why = f"needs compute capability {cc}; the {self.gpus.name} has {self.gpus.compute_capability}"
        elif self.facts is not None:
            why = compatibility(self.facts, self.gpus, eff.get("DTYPE"), eff.get("QUANTIZATION"))
            if why is None and tp is not None:
                why = valid_tp(self.facts, tp)
            if why is None and length and length > self.facts.max_model_len:
                why = f"max_model_len {length} is longer than the model's {self.facts.max_model_len}"
        if why:
            cand.reason = why
            return cand

        declared = profile.needs.gpu_memory_gb
        short = declared is not None and self.gpus.memory_bytes / 1e9 < declared
        if self.facts is not None:
            kwargs = self._plan_kwargs(eff)
            if tp is None:  # a family profile: the arithmetic picks the size
                p, cand.tried = choose_tp(self.facts, self.gpus, max_model_len=length, pp=pp, **kwargs)
                if p is None and cand.tried:
                    p = max(cand.tried, key=lambda x: x.fits_tokens)
            else:
                p = plan(self.facts, self.gpus, tp, pp, max_model_len=length, **kwargs)
            if p is None:
                cand.reason = f"no tensor-parallel size up to {self.gpus.count} is valid for this model"
                return cand
            cand.plan, cand.tensor_parallel_size, cand.gb_per_gpu = p, p.tensor_parallel_size, p.gb_per_gpu
            floor = min(MIN_CONTEXT, self.facts.max_model_len)
            if p.fits_tokens < floor:
                cand.reason = self._no_room(p)
                return cand
            if tp is None:  # the size the arithmetic picked is part of the configuration
                cand.settings = {**cand.settings, "TENSOR_PARALLEL_SIZE": p.tensor_parallel_size}
            if length is None:
                cand.max_model_len = p.max_model_len
                cand.settings = {**cand.settings, "MAX_MODEL_LEN": p.max_model_len}
            elif not p.fits:
                cand.group, cand.fits_max_model_len = LOW_MEMORY, _fits_len(p, self.facts)
                cand.reason = self._short(p, length)
                return cand
        if short:
            cand.group = LOW_MEMORY
            cand.reason = (
                f"needs {declared:g} GB per GPU; the {self.gpus.name} has {_gb(self.gpus.memory_bytes)}"
            )
            if cand.plan is not None:
                cand.fits_max_model_len = min(_fits_len(cand.plan, self.facts), length or 1 << 62)  # type: ignore[arg-type]
                cand.reason += f" ({cand.fits_max_model_len} tokens of context would fit by the arithmetic)"
            return cand
        cand.group = RUNNABLE
        cand.reason = f"fits {self.gpus.label}" + (f": {cand.plan.arithmetic()}" if cand.plan else "")
        return cand

    def computed(self) -> Candidate | None:
        """The hardware-aware defaults: smallest valid tensor-parallel size that fits, then the
        longest context. None without GPUs or without the model's config."""
        if self.facts is None or self.gpus.count == 0:
            return None
        eff = self.overrides
        tp, pp = eff.get("TENSOR_PARALLEL_SIZE"), eff.get("PIPELINE_PARALLEL_SIZE") or 1
        length = eff.get("MAX_MODEL_LEN")
        cand = Candidate(INCOMPATIBLE, None, "computed", tp, pp, length, None, "")
        why = compatibility(self.facts, self.gpus, eff.get("DTYPE"), eff.get("QUANTIZATION"))
        if why is None and tp is not None:
            why = valid_tp(self.facts, tp) or (
                f"TENSOR_PARALLEL_SIZE={tp} x {pp} needs {tp * pp} GPUs; {self.gpus.count} found"
                if tp * pp > self.gpus.count
                else None
            )
        if why:
            cand.reason = why
            return cand
        kwargs = self._plan_kwargs(eff)
        if tp is not None:
            p = plan(self.facts, self.gpus, tp, pp, max_model_len=length, **kwargs)
            chosen, cand.tried = (p if p.fits_tokens >= (length or MIN_CONTEXT) else None), [p]
        else:
            chosen, cand.tried = choose_tp(self.facts, self.gpus, max_model_len=length, pp=pp, **kwargs)
        if chosen is None:
            if not cand.tried:
                cand.reason = f"no tensor-parallel size up to {self.gpus.count} divides the model's heads"
                return cand
            best = max(cand.tried, key=lambda x: x.fits_tokens)
            cand.plan, cand.tensor_parallel_size, cand.gb_per_gpu = (
                best,
                best.tensor_parallel_size,
                best.gb_per_gpu,
            )
            if length and best.fits_tokens >= min(MIN_CONTEXT, self.facts.max_model_len):
                cand.group, cand.fits_max_model_len = LOW_MEMORY, _fits_len(best, self.facts)
                cand.reason = self._short(best, length)
            else:
                cand.reason = self._no_room(best)
            return cand
        cand.group, cand.plan = RUNNABLE, chosen
        cand.tensor_parallel_size, cand.max_model_len = chosen.tensor_parallel_size, chosen.max_model_len
        cand.gb_per_gpu = chosen.gb_per_gpu
        cand.settings = {
            "TENSOR_PARALLEL_SIZE": chosen.tensor_parallel_size,
            "MAX_MODEL_LEN": chosen.max_model_len,
        }
        whole = chosen.max_model_len >= self.facts.max_model_len
        cand.reason = (
            f"computed for {self.gpus.label}: smallest valid tensor-parallel size at which "
            + ("the model's whole context fits" if whole else "the longest context fits")
            + f"; {chosen.arithmetic()}"
        )
        return cand


def candidates(
    profiles: list[Profile],
    facts: ModelFacts | None,
    gpus: GpuSet,
    engine: str = "vllm",
    overrides: dict[str, Any] | None = None,
) -> list[Candidate]:
    """Every configuration, the one `auto` takes first: the first runnable profile in manifest
    order, else the computed defaults; then the other runnable ones, those short on memory, and
    the incompatible ones."""
    planner = Planner(facts, gpus, engine, overrides)
    out = [planner.evaluate(p) for p in profiles]
    computed = planner.computed()
    if computed is not None:
        out.append(computed)
    # A stable sort keeps manifest order inside each group; the computed one comes last among
    # the runnable, so a profile that runs is preferred to it.
    return sorted(out, key=lambda c: GROUP_ORDER[c.group])


def auto_choice(cands: list[Candidate]) -> Candidate | None:
    return cands[0] if cands and cands[0].group == RUNNABLE else None


def apply(settings: Any, cand: Candidate, user_set: set[str]) -> tuple[Any, dict[str, Any]]:
    """The settings with the candidate's values where the user set nothing, and the report /info
    shows: what was applied, and which of the profile's values the user's settings overrode.
    ENGINE_EXTRA_ARGS combine: the profile's words first, the user's after (so a flag given twice
    takes the user's value)."""
    update: dict[str, Any] = {}
    overridden: dict[str, Any] = {}
    for name, value in cand.settings.items():
        if name == "ENGINE_EXTRA_ARGS":
            update[name] = f"{value} {settings.ENGINE_EXTRA_ARGS}".strip()
        elif name in user_set:
            if getattr(settings, name) != value:
                overridden[name] = {"profile": value, "set": getattr(settings, name)}
        else:
            update[name] = value
    report = {
        "id": cand.profile,
        "match": cand.match,
        "group": cand.group,
        "reason": cand.reason,
        "applied": update,
        "overridden": overridden,
    }
    return settings.model_copy(update=update), report
