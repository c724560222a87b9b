"""Recipes: one TOML file declaring a bundle's models, LoRA adapters, agents and target board.

Parsed once, at the border, by the runtime's schema layer into typed objects; an agent is the manifest's
own AgentInfo (its sampling keys written flat in the table). Every error names the file, the key and what
was expected; unknown keys are refused. Paths are relative to the recipe file (or absolute).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the same parser, as a package
    import tomli as tomllib

from edgepack.runtime.bundle_format import AgentInfo, Tier
from edgepack.runtime.sampling import SAMPLING_KEYS, SamplingParams
from edgepack.runtime.schema import Name, SchemaError, Strict, convert

from . import vocab
from .errors import PackagerError
from .gates import TIERS

EXAMPLE = '''\
# edgepack recipe: `edgepack build --recipe edgepack.toml -o agents.edgepack`
# Paths are relative to this file. Every model, adapter and agent name is what clients and logs see.

board = "rpi5"                    # optional: a profile from `edgepack boards` (default: this machine)
# auto_promote = true             # installed as a candidate (docs/shadow.md): promoted once it proves itself

[models.base]
source = "base.gguf"              # a GGUF model (f16/bf16/f32 or already quantized), or a Hugging Face
                                  # checkpoint directory (config.json, tokenizer, safetensors): converted
                                  # by llama.cpp's convert_hf_to_gguf.py and cached
quant = "Q4_K_M"                  # a llama.cpp type, or "keep" (default: the board's type / keep)
# target_size = "160MiB"          # or plan per-tensor types to fit a size instead of one type
# tier = "general"                # refuse the build if quality degrades more (critical|general|low-risk)
# vocab = "auto"                  # trim the vocabulary to the agents' language: "auto" (needs a tier), a
                                  # token count (32768 or "32k") or a file of token ids (docs/vocab.md)
# chat_template = "chatml"        # a llama.cpp built-in template when the GGUF has none

# [models.tuned]                  # a full fine-tune of the same base: shared tensors are stored once
# source = "tuned.gguf"
# quant = "keep"

# [adapters.sql]                  # a LoRA adapter in GGUF, or a PEFT directory (adapter_config.json) over
# source = "sql-lora.gguf"        # a base built from its checkpoint directory; applied on top of its base
# base = "base"
# scale = 1.0

[agents.planner]                  # agents are the names clients put in "model"
model = "base"
system_prompt = "You plan the steps of a task."
temperature = 0.2                 # sampling defaults: temperature, top_p, top_k, min_p, repeat_penalty,
max_tokens = 256                  # frequency_penalty, presence_penalty, max_tokens, seed
# tier = "critical"               # the strictest tier of a model's agents gates that model's build
# latency_sla_ms = 800            # target time per answer (alerts; adaptive batching aims at sla / max_tokens)
# semantic_cache = 0.9            # also answer requests that mean the same (docs/semantic-cache.md); off if absent
# semantic_cache = { threshold = 0.85, embedder = "minilm" }   # ... embedded by one of the encoders
# cache_sampled = false           # true: cache answers to temperature > 0 requests too
# shadow_rate = 0.2               # as a candidate: the share of this agent's requests replayed on it
# speculate = false               # never draft this agent's tokens (serve --speculate)
# tools = "planner-tools.json"    # OpenAI tool definitions (a JSON list) offered when a request sends none
# tool_choice = "auto"            # auto | none | required | a tool's name (a request's own wins)

# [encoders.minilm]               # a sentence encoder for /v1/embeddings and semantic caches (docs/encoders.md):
# source = "all-MiniLM-L6-v2"     # a sentence-transformers BERT checkpoint directory, exported to ONNX
# quant = "int8"                  # int8 | fp32
# tier = "general"                # refuse the build if its embeddings degrade more
# runtime = "onnx"                # onnx | tflite | both: what the board runs it with (docs/tflite.md)

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
    vocab: vocab.Request | None = None


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    source: Path
    base: str
    scale: float = 1.0


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    source: Path  # a sentence-transformers checkpoint directory
    quant: str = "int8"  # of the ONNX graph
    tier: str = "general"
    runtime: str = "onnx"  # onnx | tflite | both (docs/tflite.md)
    tflite_quant: str = "auto"


@dataclass(frozen=True)
class Recipe:
    path: Path
    board: str | None
    models: tuple[ModelSpec, ...]
    adapters: tuple[AdapterSpec, ...]
    agents: tuple[AgentInfo, ...]
    encoders: tuple[EncoderSpec, ...] = ()
    auto_promote: bool = False

    def model_tier(self, model: ModelSpec) -> str | None:
        """The model's own tier, else the strictest tier among its agents."""
        if model.tier:
            return model.tier
        tiers = [a.tier for a in self.agents if a.model == model.name and a.tier]
        return min(tiers, key=lambda t: TIERS[t]) if tiers else None


# ---- the file's schema -------------------------------------------------------------------------------------

class _ModelTable(Strict):
    source: str
    quant: str | None = None  # a llama.cpp type or "keep"
    target_size: str | None = None  # a size such as "160MiB"
    tier: Tier | None = None
    chat_template: str | None = None  # a llama.cpp built-in template name
    vocab: str | int | None = None  # "auto", a token count ("32k") or a file of token ids


class _AdapterTable(Strict):
    source: str
    base: str
    scale: float = 1.0


class _EncoderTable(Strict):
    source: str
    quant: Literal["int8", "fp32"] = "int8"
    tier: Tier = "general"
    runtime: Literal["onnx", "tflite", "both"] = "onnx"
    tflite_quant: Literal["auto", "fp32", "int8", "int8-weights"] = "auto"


class _RecipeFile(Strict):
    """The top level; each table is converted on its own (_table), so an error names its key."""

    board: str | None = None
    auto_promote: bool = False
    models: dict[Name, dict[str, Any]] = {}  # _ModelTable
    adapters: dict[Name, dict[str, Any]] = {}  # _AdapterTable
    encoders: dict[Name, dict[str, Any]] = {}  # _EncoderTable
    agents: dict[Name, dict[str, Any]] = {}  # AgentInfo with the sampling keys flat (see _agent)


def load(path: Path) -> Recipe:
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PackagerError(f"{path}: cannot read recipe: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PackagerError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise PackagerError(f"{path}: not valid TOML (nested too deeply)") from None
    try:
        return _recipe(path, convert(doc, _RecipeFile, str(path)))
    except SchemaError as exc:
        raise PackagerError(str(exc)) from None


def _recipe(path: Path, doc: _RecipeFile) -> Recipe:
    if not doc.models:
        _fail(path, "models", "expected at least one [models.NAME] table")
    names = set(doc.models)
    models = []
    for name, table in doc.models.items():
        t = convert(table, _ModelTable, str(path), f"models.{name}")
        source = _source(path, f"models.{name}", t.source, directory=_CHECKPOINT)
        trim = None
        if t.vocab is not None:
            try:
                trim = vocab.parse_request(str(t.vocab), f"{path}: models.{name}.vocab:", path.parent)
            except PackagerError as exc:
                raise PackagerError(str(exc)) from None
        models.append(ModelSpec(name, source, t.quant, t.target_size, t.tier, t.chat_template, trim))
    adapters = []
    for name, table in doc.adapters.items():
        t = convert(table, _AdapterTable, str(path), f"adapters.{name}")
        if t.base not in names:
            _fail(path, f"adapters.{name}.base", f"expected one of the models ({', '.join(sorted(names))}), "
                                                 f"got {t.base!r}")
        if name in names:
            _fail(path, "adapters", f"expected names different from the models', got {name!r}")
        source = _source(path, f"adapters.{name}", t.source, directory=_PEFT)
        adapters.append(AdapterSpec(name, source, t.base, t.scale))
    encoders = []
    for name, table in doc.encoders.items():
        t = convert(table, _EncoderTable, str(path), f"encoders.{name}")
        if name in names or name in doc.agents:
            _fail(path, "encoders", f"expected names different from the models' and agents', got {name!r}")
        source = _source(path, f"encoders.{name}", t.source, directory=_CHECKPOINT)
        if not source.is_dir():
            _fail(path, f"encoders.{name}.source", f"expected {_CHECKPOINT[1]}, got {t.source!r}")
        encoders.append(EncoderSpec(name, source, t.quant, t.tier, t.runtime, t.tflite_quant))
    adapter_base = {a.name: a.base for a in adapters}
    encoder_names = {e.name for e in encoders}
    agents = tuple(_agent(path, name, table, names, adapter_base, encoder_names)
                   for name, table in doc.agents.items())
    return Recipe(path, doc.board, tuple(models), tuple(adapters), agents, tuple(encoders), doc.auto_promote)


def _agent(path: Path, name: str, table: dict[str, Any], models: set[str], adapter_base: dict[str, str],
           encoders: set[str]) -> AgentInfo:
    where = f"agents.{name}"
    fields = {k: v for k, v in table.items() if k not in SAMPLING_KEYS}
    if "name" in fields or "sampling" in fields:
        key = "name" if "name" in fields else "sampling"
        _fail(path, where, f"unknown field {key!r} (the table's key is the agent's name; sampling keys go in the"
                           " table itself)")
    sampling = convert({k: v for k, v in table.items() if k in SAMPLING_KEYS}, SamplingParams, str(path), where)
    if isinstance(fields.get("tools"), str):  # a JSON file of OpenAI tool definitions, beside the recipe
        fields["tools"] = _json_file(path, f"{where}.tools", fields["tools"])
    agent = convert({**fields, "name": name}, AgentInfo, str(path), where)
    if agent.model not in models:
        _fail(path, f"{where}.model", f"expected one of the models ({', '.join(sorted(models))}), got {agent.model!r}")
    if agent.adapter is not None and adapter_base.get(agent.adapter) != agent.model:
        _fail(path, f"{where}.adapter", f"expected an adapter whose base is {agent.model!r}, got {agent.adapter!r}")
    if agent.semantic_embedder is not None and agent.semantic_embedder not in encoders:
        _fail(path, f"{where}.semantic_cache.embedder", f"expected one of the encoders "
                                                        f"({', '.join(sorted(encoders)) or 'none declared'}), "
                                                        f"got {agent.semantic_embedder!r}")
    return msgspec.structs.replace(agent, sampling=sampling)


def _json_file(path: Path, where: str, text: str) -> Any:
    source = _source(path, where, text, key="")
    try:
        return json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(path, where, f"{source}: not readable JSON ({exc})")
    except RecursionError:
        _fail(path, where, f"{source}: not readable JSON (nested too deeply)")


# A source may be a directory holding this file: (its name, what such a directory is)
_CHECKPOINT = ("config.json", "a Hugging Face checkpoint directory")
_PEFT = ("adapter_config.json", "a PEFT LoRA adapter directory")


def _source(path: Path, where: str, text: str, key: str = ".source",
            directory: tuple[str, str] | None = None) -> Path:
    source = Path(text) if Path(text).is_absolute() else path.parent / text
    if directory is not None and source.is_dir():
        marker, kind = directory
        if not (source / marker).is_file():
            _fail(path, f"{where}{key}", f"expected {kind} (with {marker}), got {text!r}")
        return source
    if not source.is_file():
        expected = f"an existing file or {directory[1]}" if directory else "an existing file"
        _fail(path, f"{where}{key}", f"expected {expected}, got {text!r}")
    return source


def _fail(path: Path, key: str, message: str) -> None:
    raise PackagerError(f"{path}: {key}: {message}")
