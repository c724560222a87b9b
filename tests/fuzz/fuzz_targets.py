"""Fuzz targets: one function per parser of untrusted bytes, shared by the suite (hypothesis, tests/fuzz/) and
bench/fuzz.py (atheris or hypothesis, long runs), with the valid inputs their mutations start from.

A target takes bytes and returns when the parser accepted them or refused them with the project's error in one
line; anything else (another exception, a refusal that changed the store, a crashed llama.cpp) raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from store_snapshot import snapshot

from edgepack.packager.recipe import EXAMPLE
from edgepack.packager.recipe import load as load_recipe
from edgepack.runtime import llama_server_api, openai_api, signatures
from edgepack.runtime.bundle_format import (
    MANIFEST_NAME,
    MEDIA_GGUF_LORA,
    SIGNATURE_NAME,
    AdapterInfo,
    AgentInfo,
    BlobInfo,
    Digest,
    Manifest,
    ModelInfo,
)
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.local_config import LIMITS, parse_local_config
from edgepack.runtime.sampling import SamplingParams
from edgepack.runtime.store import Store

HERE = Path(__file__).resolve().parent
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fixed: seeds and corpus stay byte-identical


@contextlib.contextmanager
def refused_in_one_line(kind: type[Exception] = EdgepackError) -> Iterator[None]:
    """Let `kind` through as a refusal when its message is one non-empty line; anything else propagates."""
    try:
        yield
    except kind as exc:
        assert_one_line(exc)


def assert_one_line(exc: Exception) -> None:
    message = str(exc)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)


# ---- manifest.json ---------------------------------------------------------------------------------------------

BLOBS = {name: hashlib.sha256(name).digest() * 16 for name in (b"segment", b"adapter")}  # 512 bytes each


def seed_manifest() -> Manifest:
    segment, adapter = (Digest.of_bytes(BLOBS[n]) for n in (b"segment", b"adapter"))
    frames = {d: _zstd(BLOBS[n]) for d, n in ((segment, b"segment"), (adapter, b"adapter"))}
    return Manifest(
        name="tiny", bundle_version=2, created="2026-11-27T00:00:00Z", builder="edgepack fuzz",
        llama_cpp_version="b0", board="host",
        models=(ModelInfo(name="tiny", architecture="llama", parameters=1, file_type="F32", quant_types={"f32": 1},
                          segments=(segment,), chat_template=None, context_length=512),),
        adapters=(AdapterInfo(name="sql", base="tiny", digest=adapter, scale=0.5),),
        agents=(AgentInfo(name="planner", model="tiny", adapter="sql", system_prompt="Plan.",
                          sampling=SamplingParams(temperature=0.2, max_tokens=8)),),
        blobs={segment: BlobInfo(size=512, zsize=len(frames[segment])),
               adapter: BlobInfo(size=512, zsize=len(frames[adapter]), media_type=MEDIA_GGUF_LORA)},
    )


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def manifest(data: bytes) -> None:
    """Manifest.from_json; what it accepts, the store writes with to_json and must read back the same."""
    with refused_in_one_line():
        parsed = Manifest.from_json(data)
        assert Manifest.from_json(parsed.to_json()) == parsed


# ---- manifest.sig ----------------------------------------------------------------------------------------------

def signature(data: bytes) -> None:
    """A manifest.sig member as the store checks it against its trusted keys."""
    manifest_bytes = seed_manifest().to_json()
    public = KEY.public_key()
    with refused_in_one_line():
        signatures.verify(manifest_bytes, data, {signatures.key_id(public): public}, "bundle")


# ---- bundles ---------------------------------------------------------------------------------------------------

def write_bundle(members: list[tuple[tarfile.TarInfo, bytes]], tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
        end = archive.offset
    return out.getvalue()[:end + 2 * tarfile.BLOCKSIZE]  # the end marker, without tarfile's record padding


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime, info.mode = kind, len(data) if kind == tarfile.REGTYPE else 0, 0, 0o644
    return info, data


def seed_members(signed: bool = False) -> list[tuple[tarfile.TarInfo, bytes]]:
    m = seed_manifest()
    data = m.to_json()
    out = [member(MANIFEST_NAME, data)]
    if signed:
        out.append(member(SIGNATURE_NAME, signatures.sign(data, KEY)))
    names = {Digest.of_bytes(v): v for v in BLOBS.values()}
    return out + [member(d.member_name, _zstd(names[d])) for d in m.blobs]


def seed_bundle(signed: bool = False) -> bytes:
    return write_bundle(seed_members(signed))


def fix_header_checksums(data: bytes) -> bytes:
    """Recompute the checksum of every 512-byte block that carries the ustar magic, so that mutated header
    fields reach the parser instead of stopping at the checksum."""
    out = bytearray(data)
    for start in range(0, len(out) - 511, 512):
        block = out[start:start + 512]
        if block[257:262] == b"ustar":
            block[148:156] = b" " * 8
            out[start + 148:start + 156] = b"%06o\0 " % (sum(block) & 0o777777)
    return bytes(out)




class BundleInstall:
    """`Store.install` of the bytes, into a fresh store and into one holding an older release of the same
    bundle, signed and trusting the signer: a refused bundle must leave each store byte-identical; an accepted
    one must leave a store whose current manifest reads back and whose blobs hash to their names."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.template = work / "template"
        older = seed_members(signed=True)
        doc = json.loads(older[0][1])
        doc["bundle_version"] = 1
        data = json.dumps(doc).encode()
        older[0:2] = [member(MANIFEST_NAME, data), member(SIGNATURE_NAME, signatures.sign(data, KEY))]
        (work / "older.edgepack").write_bytes(write_bundle(older))
        pem = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (work / "key.pub").write_bytes(pem)
        signatures.add_trusted(self.template, work / "key.pub")
        Store(self.template).install(work / "older.edgepack")

    def __call__(self, data: bytes) -> None:
        bundle = self.work / "input.edgepack"
        bundle.write_bytes(fix_header_checksums(data))
        for fresh in (True, False):
            root = self.work / "store"
            shutil.rmtree(root, ignore_errors=True)
            if not fresh:
                shutil.copytree(self.template, root, symlinks=True)
            before = snapshot(root)
            try:
                Store(root).install(bundle)
            except EdgepackError as exc:
                assert_one_line(exc)
                assert snapshot(root) == before, f"a refused bundle changed the store ({exc})"
            else:
                self._check_installed(Store(root))

    @staticmethod
    def _check_installed(store: Store) -> None:
        installed = store.manifest()
        for digest in installed.blobs:
            assert Digest.of_bytes(store.blob_path(digest).read_bytes()) == digest, f"blob {digest} is not its digest"


# ---- local.json ------------------------------------------------------------------------------------------------

SEED_LOCAL_CONFIG = json.dumps({"format": 1, "threads": 4, "slots": 2, "n_batch": 512, "threads_batch": 4,
                                "measured": {"cpus": 4, "results": [{"threads": 4, "tokens_per_s": 12.5}]}}).encode()


def local_config(data: bytes) -> None:
    with refused_in_one_line():
        values = parse_local_config(data, "local.json")
        for key, value in values.items():
            low, high = LIMITS[key]
            assert low <= value <= high, f"{key}={value} outside {LIMITS[key]}"


# ---- recipes ---------------------------------------------------------------------------------------------------

SEED_RECIPE = (EXAMPLE + '''
[models.tuned]
source = "tuned.gguf"
quant = "keep"

[adapters.sql]
source = "sql-lora.gguf"
base = "base"

[agents.sql]
model = "base"
adapter = "sql"
tools = "tools.json"
tool_choice = "auto"
top_k = 40
''').encode()


class RecipeLoad:
    """`packager.recipe.load` of the bytes as edgepack.toml, beside the files the seed names."""

    def __init__(self, work: Path) -> None:
        self.path = work / "edgepack.toml"
        for name in ("base.gguf", "tuned.gguf", "sql-lora.gguf"):
            (work / name).write_bytes(b"GGUF")
        tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
        (work / "tools.json").write_text(json.dumps(tools))

    def __call__(self, data: bytes) -> None:
        self.path.write_bytes(data)
        with refused_in_one_line():
            load_recipe(self.path)


# ---- HTTP request bodies ---------------------------------------------------------------------------------------

SEED_CHAT = json.dumps({
    "model": "planner", "messages": [{"role": "system", "content": "Plan."},
                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "max_tokens": 8, "temperature": 0.5, "stop": ["\n"], "logit_bias": {"5": -1}, "n": 2,
    "tools": [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "response_format": {"type": "text"}, "logprobs": True, "top_logprobs": 2,
    "stream": True, "stream_options": {"include_usage": True}}).encode()
SEED_COMPLETION = json.dumps({"model": "tiny", "prompt": "Once upon", "max_tokens": 8, "stop": "x", "logprobs": 2,
                              "grammar": 'root ::= "a"', "seed": 1}).encode()
SEED_NATIVE = json.dumps({"prompt": [1, 2, 3], "n_predict": 4, "stop": ["x"], "n_probs": 2, "top_k": 5,
                          "logit_bias": [[5, False], ["the", -1.5]], "json_schema": {"type": "string"}}).encode()


def _native_completion(body: bytes) -> object:
    return llama_server_api._completion_request(llama_server_api._decode(body, llama_server_api._CompletionBody))


REQUEST_PARSERS: dict[str, Callable[[bytes], object]] = {
    "chat": openai_api.parse_chat,
    "completion": openai_api.parse_completion,
    "native": _native_completion,
    "tokenize": lambda body: llama_server_api._decode(body, llama_server_api._TokenizeBody),
    "detokenize": lambda body: llama_server_api._decode(body, llama_server_api._DetokenizeBody),
}


def request_body(data: bytes) -> None:
    """Every request parser of the HTTP API on the same body: a 4xx ApiError or a request, nothing else."""
    for parse in REQUEST_PARSERS.values():
        try:
            parse(data)
        except openai_api.ApiError as exc:
            assert 400 <= exc.status < 500, f"status {exc.status} for a bad body: {exc}"
            assert exc.message.strip() and "\n" not in exc.message, repr(exc.message)
            json.dumps(exc.body())


# ---- GGUF files llama.cpp loads --------------------------------------------------------------------------------

def seed_gguf(path: Path) -> Path:
    """A tiny llama (one block, 64 wide, ~330 KB) llama.cpp loads and decodes in milliseconds."""
    sys.path.insert(0, str(HERE.parent))
    from tiny_model import write_tiny_llama

    return write_tiny_llama(path, n_layer=1, n_embd=64, n_ff=128, n_head=2)


def gguf_data_offset(data: bytes) -> int:
    """Where the tensor data starts: mutations before it hit the metadata and tensor table that parsers read."""
    from gguf import GGUFReader

    with tempfile.NamedTemporaryFile(suffix=".gguf") as file:
        file.write(data)
        file.flush()
        return GGUFReader(file.name).data_offset


# GGML_ASSERTs that llama.cpp (llama-cpp-python 0.3.36) aborts the process with on a malformed GGUF: reported
# upstream, listed in docs/bundle-format.md ("Trust boundary"), kept in tests/fuzz/test_fuzz_gguf.py.
KNOWN_UPSTREAM = {
    "block count": "GGML_ASSERT(hparams.n_layer_all > 0 && hparams.n_layer_all <= LLAMA_MAX_LAYERS) failed",
    "duplicate token": "GGML_ASSERT(id_to_token.size() == token_to_id.size()) failed",
    "negative norm epsilon": "GGML_ASSERT(eps >= 0.0f) failed",
    "head count overflow": "GGML_ASSERT(ggml_nelements(a) == ne0*ne1*ne2) failed",
}


class GgufCrash(AssertionError):
    """llama.cpp died or hung on a GGUF file: a finding for upstream (docs/bundle-format.md, "Trust boundary")."""


class GgufLoader:
    """llama.cpp loading GGUF files in a worker process (gguf_worker.py) that is restarted after a crash."""

    def __init__(self, work: Path, timeout: float = 20.0) -> None:
        self.work, self.timeout = work, timeout
        self.log = work / "gguf_worker.log"
        self.process: subprocess.Popen | None = None
        self.known_crashes: dict[str, int] = {}

    def _start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            with open(self.log, "wb") as log:
                self.process = subprocess.Popen([sys.executable, str(HERE / "gguf_worker.py")], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=log, text=True,
                                                env={**os.environ, "GGML_NO_BACKTRACE": "1"})  # no gdb on abort
        return self.process

    def load(self, data: bytes) -> str:
        """"ok" or "refused: ..." from llama.cpp; GgufCrash if the file killed or hung it."""
        path = self.work / "input.gguf"
        path.write_bytes(data)
        process = self._start()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(f"{path}\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], self.timeout)
        answer = process.stdout.readline() if ready else ""
        if answer:
            return answer.strip()
        if not ready:
            self.close()
            raise GgufCrash(f"llama.cpp did not finish loading within {self.timeout:g}s")
        code = process.wait()
        raise GgufCrash(f"llama.cpp died loading the file ({_exit(code)}): {self._last_words()}")

    def _last_words(self) -> str:
        """llama.cpp's failed assertion or last log line, without the build's path."""
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        line = next((x for x in reversed(lines) if "GGML_ASSERT" in x or "error" in x.lower()), lines[-1] if lines
                    else "nothing logged")
        return line.split("/vendor/llama.cpp/")[-1]

    def __call__(self, data: bytes) -> None:
        """The fuzz target: a crash already reported upstream (KNOWN_UPSTREAM) is counted, any other raised."""
        try:
            self.load(data)
        except GgufCrash as crash:
            known = next((k for k, text in KNOWN_UPSTREAM.items() if text in str(crash)), None)
            if known is None:
                raise
            self.known_crashes[known] = self.known_crashes.get(known, 0) + 1

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def _exit(code: int) -> str:
    if code < 0:
        import signal

        return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def seeds() -> dict[str, list[bytes]]:
    """The valid inputs of each byte-level target (the saved corpus, bench/fuzz-corpus/, starts from these)."""
    return {
        "bundle": [seed_bundle(signed=True)],  # with no key trusted, the signature is simply not checked
        "manifest": [seed_manifest().to_json()],
        "signature": [signatures.sign(seed_manifest().to_json(), KEY)],
        "local_config": [SEED_LOCAL_CONFIG],
        "recipe": [SEED_RECIPE],
        "request_body": [SEED_CHAT, SEED_COMPLETION, SEED_NATIVE],
    }
