"""Recipes: one TOML file declaring a bundle's models, LoRA adapters, agents and target board.

Parsed once, at the border, into typed objects; every error names the file, the key and what was
expected. Paths are relative to the recipe file (or absolute).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.runtime.bundle_format import AgentInfo, check_name
from edgepack.runtime.errors import EdgepackError

from .errors import PackagerError
from .gates import TIERS

SAMPLING_KEYS = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float,
    "max_tokens": int, "seed": int,
}

EXAMPLE = '''\
# edgepack recipe: `edgepack build --recipe edgepack.toml -o agents.edgepack`
# Paths are relative to this file. Every model, adapter and agent name is what clients and logs see.

board = "rpi5"                    # optional: a profile from `edgepack boards` (default: this machine)

[models.base]
source = "base.gguf"              # a GGUF model (f16/bf16/f32 or already quantized)
quant = "Q4_K_M"                  # a llama.cpp type, or "keep" (default: the board's type / keep)
# target_size = "160MiB"          # or plan per-tensor types to fit a size instead of one type
# tier = "general"                # refuse the build if quality degrades more (critical|general|low-risk)
# chat_template = "chatml"        # a llama.cpp built-in template when the GGUF has none

# [models.tuned]                  # a full fine-tune of the same base: shared tensors are stored once
# source = "tuned.gguf"
# quant = "keep"

# [adapters.sql]                  # a LoRA adapter in GGUF (convert PEFT ones with llama.cpp's
# source = "sql-lora.gguf"        # convert_lora_to_gguf.py), applied on top of its base model
# base = "base"
# scale = 1.0

[agents.planner]                  # agents are the names clients put in "model"
model = "base"
system_prompt = "You plan the steps of a task."
temperature = 0.2                 # sampling defaults: temperature, top_p, top_k, min_p,
max_tokens = 256                  # repeat_penalty, max_tokens, seed
# tier = "critical"               # the strictest tier of a model's agents gates that model's build
# latency_sla_ms = 800            # target time per answer (alerts; adaptive batching aims at sla / max_tokens)
# semantic_cache = 0.9            # also answer requests that mean the same (docs/semantic-cache.md); off if absent
# cache_sampled = false           # true: cache answers to temperature > 0 requests too

# [agents.sql]
# model = "base"
# adapter = "sql"
# system_prompt = "You write SQL."
# temperature = 0
'''


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: Path
    quant: str | None = None
    target_size: str | None = None
    tier: str | None = None
    chat_template: str | None = None


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    source: Path
    base: str
    scale: float = 1.0


@dataclass(frozen=True)
class Recipe:
    path: Path
    board: str | None
    models: tuple[ModelSpec, ...]
    adapters: tuple[AdapterSpec, ...]
    agents: tuple[AgentInfo, ...]

    def model_tier(self, model: ModelSpec) -> str | None:
        """The model's own tier, else the strictest tier among its agents."""
        if model.tier:
            return model.tier
        tiers = [a.tier for a in self.agents if a.model == model.name and a.tier]
        return min(tiers, key=lambda t: TIERS[t]) if tiers else None


class _Table:
    """One TOML table with typed getters whose errors name the file and the key."""

    def __init__(self, path: Path, key: str, doc: Any) -> None:
        self.path, self.key = path, key
        if not isinstance(doc, dict):
            self.fail("", "a table", doc)
        self.doc = doc

    def fail(self, key: str, expected: str, got: Any) -> None:
        where = ".".join(k for k in (self.key, key) if k) or "top level"
        raise PackagerError(f"{self.path}: {where}: expected {expected}, got {got!r}")

    def get(self, key: str, kind: type | tuple[type, ...], expected: str, required: bool = False) -> Any:
        value = self.doc.get(key)
        if value is None:
            if required:
                self.fail(key, expected, "nothing")
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                    else (kind,))):
            self.fail(key, expected, value)
        return value

    def unknown(self, allowed: set[str]) -> None:
        extra = sorted(set(self.doc) - allowed)
        if extra:
            self.fail(extra[0], f"one of {', '.join(sorted(allowed))}", "an unknown key")

    def name(self, value: str) -> str:
        try:
            return check_name(value, "name")
        except EdgepackError:
            self.fail("", "a name of letters, digits, '.', '_' or '-'", value)
            raise

    def source(self, key: str = "source") -> Path:
        text = self.get(key, str, "a path to a file", required=True)
        path = Path(text) if Path(text).is_absolute() else self.path.parent / text
        if not path.is_file():
            self.fail(key, "an existing file", text)
        return path

    def tier(self) -> str | None:
        tier = self.get("tier", str, f"one of {', '.join(TIERS)}")
        if tier is not None and tier not in TIERS:
            self.fail("tier", f"one of {', '.join(TIERS)}", tier)
        return tier


def load(path: Path) -> Recipe:
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PackagerError(f"{path}: cannot read recipe: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PackagerError(f"{path}: not valid TOML ({exc})") from None
    top = _Table(path, "", doc)
    top.unknown({"board", "models", "adapters", "agents"})
    board = top.get("board", str, "a board name")
    models = tuple(_model(_Table(path, f"models.{k}", v), k) for k, v in _tables(top, "models").items())
    if not models:
        top.fail("models", "at least one [models.NAME] table", "none")
    names = {m.name for m in models}
    adapters = tuple(_adapter(_Table(path, f"adapters.{k}", v), k, names) for k, v in _tables(top, "adapters").items())
    adapter_base = {a.name: a.base for a in adapters}
    agents = tuple(_agent(_Table(path, f"agents.{k}", v), k, names, adapter_base)
                   for k, v in _tables(top, "agents").items())
    taken = names & set(adapter_base)
    if taken:
        top.fail("adapters", "names different from the models'", sorted(taken)[0])
    return Recipe(path, board, models, adapters, agents)


def _tables(top: _Table, key: str) -> dict[str, Any]:
    return top.get(key, dict, f"[{key}.NAME] tables") or {}


def _model(t: _Table, name: str) -> ModelSpec:
    t.unknown({"source", "quant", "target_size", "tier", "chat_template"})
    return ModelSpec(
        name=t.name(name), source=t.source(), quant=t.get("quant", str, "a llama.cpp type or 'keep'"),
        target_size=t.get("target_size", str, "a size such as '160MiB'"), tier=t.tier(),
        chat_template=t.get("chat_template", str, "a llama.cpp template name"),
    )


def _adapter(t: _Table, name: str, models: set[str]) -> AdapterSpec:
    t.unknown({"source", "base", "scale"})
    base = t.get("base", str, "the name of a model in [models]", required=True)
    if base not in models:
        t.fail("base", f"one of the models ({', '.join(sorted(models))})", base)
    scale = t.get("scale", (int, float), "a number")
    return AdapterSpec(t.name(name), t.source(), base, float(scale) if scale is not None else 1.0)


def _agent(t: _Table, name: str, models: set[str], adapter_base: dict[str, str]) -> AgentInfo:
    t.unknown({"model", "adapter", "system_prompt", "tier", "latency_sla_ms", "semantic_cache", "cache_sampled",
               *SAMPLING_KEYS})
    model = t.get("model", str, "the name of a model in [models]", required=True)
    if model not in models:
        t.fail("model", f"one of the models ({', '.join(sorted(models))})", model)
    adapter = t.get("adapter", str, "the name of an adapter in [adapters]")
    if adapter is not None and adapter_base.get(adapter) != model:
        t.fail("adapter", f"an adapter whose base is {model!r}", adapter)
    sampling = {}
    for key, kind in SAMPLING_KEYS.items():
        value = t.get(key, (int, float) if kind is float else int, "a number" if kind is float else "an integer")
        if value is not None:
            sampling[key] = kind(value)
    sla = t.get("latency_sla_ms", int, "an integer (milliseconds)")
    semantic = t.get("semantic_cache", (int, float), "a cosine similarity between 0.5 and 1")
    if semantic is not None and not 0.5 <= semantic <= 1:
        t.fail("semantic_cache", "a cosine similarity between 0.5 and 1", semantic)
    return AgentInfo(t.name(name), model, adapter, t.get("system_prompt", str, "a string"), sampling, t.tier(), sla,
                     None if semantic is None else float(semantic), bool(t.get("cache_sampled", bool, "true or false")))
