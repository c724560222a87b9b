"""The `edgepack` command. Device commands live here; host commands (build, inspect, demo) are
added from edgepack.packager when it is installed, so a board needs none of the host tools.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import socket
import sys
from pathlib import Path

import click
import msgspec

from . import __version__
from .boards import board_memory_gib, host_profile, known_board, list_boards
from .cli_common import format_table, store_option
from .errors import EdgepackError
from .local_config import read_local_config
from .memory import format_mib
from .sd_notify import notify
from .serve_config import resolve_config, tpot_targets
from .store import Store
from .trial_command import promote, reject, start_trial

# Commands whose modules load only when they run: `serve` imports neither the tuning sweep nor the unit writer.
_LAZY_COMMANDS = {
    "alerts": "edgepack.runtime.alerts_command:alerts_command",
    "blobs": "edgepack.runtime.blobs_command:blobs_command",
    "doctor": "edgepack.runtime.doctor:doctor_command",
    "trust": "edgepack.runtime.trust_command:trust_command",
    "tune": "edgepack.runtime.tune_command:tune_command",
    "unit": "edgepack.runtime.systemd_unit:unit_command",
}


class _Group(click.Group):
    """Turns every EdgepackError into one line on stderr and exit status 1; loads _LAZY_COMMANDS on use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY_COMMANDS:
            module, attr = _LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except EdgepackError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="edgepack")
def cli() -> None:
    """Build, ship and serve compressed agent models on edge devices."""


@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@store_option
@click.option("--allow-downgrade", is_flag=True,
              help="Install a bundle older than (or another build of the same version as) the installed release.")
@click.option("--activate", is_flag=True,
              help="Keep the new release only if it proves healthy (models load within the budget, /health ok, every "
                   "agent answers a short greedy request); else go back to the previous release and exit 1.")
@click.option("--health-timeout", default=120.0, show_default=True, type=click.FloatRange(1),
              help="Seconds the new release has to become healthy (with --activate).")
@click.option("--memory-budget", help="With --activate: the budget to check the release in (as serve's).")
@click.option("--service", help="With --activate: then restart this systemd unit (e.g. edgepack) on the release and "
                                "wait for its /health; on failure it is restarted on the previous release.")
@click.option("--service-url", default="http://127.0.0.1:8080", show_default=True,
              help="Where --service answers /health.")
@click.option("--candidate", is_flag=True,
              help="Install beside the current release as a candidate, for serve to shadow and A/B test "
                   "(docs/shadow.md); current and previous stay as they are.")
def install(bundle: Path, store_dir: Path, allow_downgrade: bool, activate: bool, health_timeout: float,
            memory_budget: str | None, service: str | None, service_url: str, candidate: bool) -> None:
    """Verify BUNDLE (digests, and its signature when the store trusts keys) and install it as the store's
    current release (or, with --candidate, beside it)."""
    if candidate and activate:
        raise EdgepackError("--candidate and --activate do not go together: a candidate is judged by serve on live "
                            "traffic (docs/shadow.md)")
    store = Store(store_dir)
    result = store.install(bundle, allow_downgrade=allow_downgrade, candidate=candidate)
    m = result.manifest
    if candidate:
        click.echo(f"installed {m.name} v{m.bundle_version} as candidate {result.release} beside "
                   f"{store.release_id()}: {result.blobs_written} blob(s) written "
                   f"({format_mib(result.bytes_written, 1)}), {result.blobs_skipped} shared; restart serve to "
                   "start its trial")
        return
    if result.already_current:
        click.echo(f"{m.name} v{m.bundle_version} is already the current release ({result.release})")
    else:
        click.echo(
            f"installed {m.name} v{m.bundle_version} as release {result.release}: "
            f"{result.blobs_written} blob(s) written ({format_mib(result.bytes_written, 1)}), "
            f"{result.blobs_skipped} already present, {result.seconds:.2f}s"
        )
    if activate:
        from .activation import activate as activate_release

        outcome = activate_release(store, health_timeout, memory_budget, service, service_url.rstrip("/"))
        if not outcome.healthy:
            back = (f"rolled back to {outcome.rolled_back_to}" if outcome.rolled_back_to
                    else "no previous release to go back to")
            raise EdgepackError(f"release {outcome.release} ({m.name} v{m.bundle_version}) failed its health check "
                                f"in {outcome.seconds:.1f}s: {outcome.reason}; {back}")
        click.echo(f"activated {outcome.release}: healthy in {outcome.seconds:.1f}s ({outcome.reason})")


@cli.command()
@store_option
def rollback(store_dir: Path) -> None:
    """Switch back to the previous release."""
    current, previous = Store(store_dir).rollback()
    click.echo(f"current release is now {current} (previous: {previous})")


@cli.command()
@store_option
def gc(store_dir: Path) -> None:
    """Remove blobs and releases that neither the current nor the previous release needs."""
    releases, blobs, freed = Store(store_dir).gc()
    click.echo(f"removed {len(releases)} release(s) and {blobs} blob(s), freed {format_mib(freed, 1)}")


@cli.command()
@store_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address(es) to listen on, comma-separated (e.g. 127.0.0.1,::1): one socket each.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", type=int, help="Threads per model (default: the board's, else physical cores).")
@click.option("--ctx", "n_ctx", type=int, help="Context size per model (default: the bundle's).")
@click.option("--threads-batch", type=int,
              help="Threads for prompt processing, if it runs faster with another count than generation "
                   "(default: --threads).")
@click.option("--repack", default="auto", show_default=True, type=click.Choice(["auto", "always", "never"]),
              help="llama.cpp weight repacking: faster kernels for some types, but private copies of the weights; "
                   "auto repacks only models that share no segment with another.")
@click.option("--slots", type=click.IntRange(1, 64),
              help="Requests decoded together per model (continuous batching); each slot has --ctx tokens "
                   "(default: `edgepack tune`'s choice, else 4; 2 with one thread).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a slot; beyond that, 429 with Retry-After.")
@click.option("--request-timeout", default=300.0, show_default=True, type=click.FloatRange(0.001),
              help="Seconds a request may take before it is cancelled (504).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Cache answers to deterministic (temperature 0) requests: L1 in memory, L2 in DIR/cache/.")
@click.option("--cache-ttl", default=120.0, show_default=True, type=click.FloatRange(0), help="L1 seconds.")
@click.option("--disk-cache-ttl", default=3600.0, show_default=True, type=click.FloatRange(0), help="L2 seconds.")
@click.option("--semantic-cache", "semantic_threshold", type=click.FloatRange(0.5, 1.0),
              help="Also answer deterministic requests whose last user message means the same as a cached one "
                   "(cosine similarity at or above this, e.g. 0.9; off by default: see docs/semantic-cache.md).")
@click.option("--memory-budget", help="Memory the server may use: a size (2G, 1500MiB) or a share of the available "
                                      "memory (70%). Default: 80% of available, capped by the board and cgroup.")
@click.option("--keep-alive", default="5m", show_default=True,
              help="Evict a model after this long without requests (30s, 5m, 1h; -1: never).")
@click.option("--preload", is_flag=True, help="Load and warm up every model before reporting ready.")
@click.option("--warm-state/--no-warm-state", default=True, show_default=True,
              help="Keep each agent's system-prompt KV state ready in a slot, saved in the release for restarts.")
@click.option("--warmup", "warmup", default="singles,batch", show_default=True,
              help="Warm-up stages run when a model loads: singles (one-at-a-time requests: cold, then warm), "
                   "batch (one concurrent request per slot); 'none' for neither. The agents' system prompts are "
                   "the warm state (--no-warm-state).")
@click.option("--kv-type", default="f16", show_default=True, type=click.Choice(["f16", "q8_0"]),
              help="KV cache element type (q8_0 halves its memory).")
@click.option("--tpot-target", type=click.FloatRange(min=0.1),
              help="Milliseconds per output token the adaptive batch size keeps p95 under (default: from the "
                   "agents' latency_sla_ms / max_tokens; none: all slots always).")
@click.option("--max-unstable-starts", default=3, show_default=True, type=click.IntRange(0),
              help="Roll back to the previous release when the current one has started this many times in a row "
                   "without running --stable-after seconds (a crash loop under systemd); 0: never.")
@click.option("--stable-after", default=120.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds after ready that count a start as stable (resets the count).")
@click.option("--gpu-layers", type=click.IntRange(-1),
              help="Layers to offload to the GPU in a CUDA build (-1: all; default: the board's, all on a Jetson; "
                   "0: CPU only).")
@click.option("--cors-origins", default="",
              help="Origins whose browser pages may call the API, comma-separated (https://app.example), or * for any "
                   "(default: none, no CORS headers).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Require 'Authorization: Bearer KEY' on every route but /health, KEY one of this file's lines "
                   "(blank lines and # comments skipped). Keys are also read from the systemd credential "
                   "edgepack-api-keys and from $EDGEPACK_API_KEYS; never from the command line.")
@click.option("--metrics-open", is_flag=True, help="Keep /metrics reachable without a key (when keys are set).")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1),
              help="Open connections at most; a new one closes the longest idle, else its request gets 503.")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(0.001),
              help="Seconds a client has to send a request's whole head (from connecting, or from the last answer "
                   "on a kept-alive connection); then the connection is closed.")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(0.001),
              help="Seconds a client has to send a request's body once its head arrived; then it is closed.")
@click.option("--idle-timeout", default=5.0, show_default=True, type=click.FloatRange(0.001),
              help="Seconds an idle kept-alive connection stays open.")
@click.option("--shadow-rate", type=str,
              help="With a candidate release in the store: the share of live requests replayed on it and compared, "
                   "e.g. 20%, for every agent (default: each agent's shadow_rate in the candidate's recipe, else "
                   "20%; 0 turns shadowing off). docs/shadow.md")
@click.option("--ab", "ab_rate", default="0%", show_default=True,
              help="With a candidate: the share of conversations it answers live (sticky per X-Session-Id).")
@click.option("--auto-promote", is_flag=True,
              help="Promote a candidate whose decisions agree within every agent's tier (also when its recipe sets "
                   "auto_promote; else it is reported ready).")
@click.option("--min-decisions", default=200, show_default=True, type=click.IntRange(1),
              help="Compared decisions per agent before a candidate is judged.")
@click.option("--speculate", type=click.IntRange(0, 32),
              help="Speculative decoding: tokens a request may draft per step from n-grams of its prompt, its "
                   "output and its agent's earlier requests (0: off; default: `edgepack tune`'s choice, else 16).")
@click.option("--embed-runtime", type=click.Choice(["onnx", "tflite"]),
              help="Run encoders that have both on ONNX Runtime or a TFLite interpreter (default: the board "
                   "profile's embed_runtime, else onnx); one whose package is missing falls back to the other.")
def serve(store_dir: Path, host: str, port: int, threads: int | None, n_ctx: int | None, threads_batch: int | None,
          repack: str, slots: int | None, max_queue: int, request_timeout: float, cache: bool, cache_ttl: float,
          disk_cache_ttl: float, semantic_threshold: float | None, memory_budget: str | None, keep_alive: str,
          preload: bool, warm_state: bool, warmup: str, kv_type: str, tpot_target: float | None,
          max_unstable_starts: int, stable_after: float, gpu_layers: int | None, cors_origins: str,
          api_key_file: Path | None, metrics_open: bool, max_connections: int, header_timeout: float,
          body_timeout: float, idle_timeout: float, shadow_rate: str | None, ab_rate: str, auto_promote: bool,
          min_decisions: int, speculate: int | None, embed_runtime: str | None) -> None:
    """Serve the current release over an OpenAI-compatible HTTP API."""
    import uvicorn

    from . import boot_count
    from .auth import is_loopback, load_api_keys
    from .http_guard import Limits, fit_open_files
    from .memory import resolve_budget
    from .pool import ModelPool
    from .response_cache import ResponseCache
    from .semantic_cache import DEFAULT_THRESHOLD, SemanticCache
    from .server import Service

    api_keys = load_api_keys(api_key_file)  # a key file that fails ends here, before anything starts
    max_connections, backlog, lowered = fit_open_files(max_connections)
    limits = Limits(max_connections, header_timeout, body_timeout, idle_timeout, backlog)
    store = Store(store_dir)
    store.manifest()  # no release: the usual one-line error, before counting anything
    if max_unstable_starts:
        abandoned = boot_count.on_start(store, max_unstable_starts)
        if abandoned:
            click.echo(f"edgepack: warning: {abandoned}", err=True)
    manifest = store.manifest()
    notify(f"STATUS=loading {manifest.name} v{manifest.bundle_version}")
    local = read_local_config(store)
    config = resolve_config(manifest, threads, n_ctx, repack, slots, kv_type, local=local,
                            threads_batch=threads_batch, gpu_layers=gpu_layers, speculate=speculate)
    keep = parse_duration(keep_alive)
    stages = parse_stages(warmup)
    budget = resolve_budget(memory_budget, board_memory_gib(manifest.board))
    trial = start_trial(store, manifest, shadow_rate, ab_rate, auto_promote, min_decisions,
                        lambda line: click.echo(f"edgepack: {line}", err=True))
    served = trial.manifest if trial is not None else manifest  # with a candidate: both releases' models
    for info in served.models:
        store.segment_paths(served, info.name)  # fail now, not in the background, if blobs are missing
    store.adapter_paths(served)
    server: uvicorn.Server | None = None
    sockets = listen(host, port)  # before anything starts: a failed bind ends here, never "ready"
    urls = ", ".join(url(address, port) for address in parse_hosts(host))

    def on_ready() -> None:
        status = f"ready on {urls} ({', '.join(names)}, {config.threads} threads)"
        click.echo(f"edgepack: {status}", err=True)
        notify(f"READY=1\nSTATUS={status}")
        if max_unstable_starts:
            boot_count.mark_stable_after(store, stable_after)

    def on_failure(message: str) -> None:
        click.echo(f"edgepack: error: {message}", err=True)
        notify(f"STATUS=failed: {message}")
        if server is not None:
            server.should_exit = True

    def make_pool(make_scheduler) -> ModelPool:  # noqa: ANN001 - see server.PoolFactory
        return ModelPool(store, served, config, budget, keep_alive=keep, warm_state=warm_state, warmup=stages,
                         embedding_models=frozenset(a.model for a in by_meaning if a.semantic_embedder is None),
                         embed_runtime=embed_runtime or getattr(known_board(manifest.board), "embed_runtime", "onnx"),
                         make_scheduler=make_scheduler,
                         log=lambda line: click.echo(f"edgepack: {line}", err=True))

    agents = list(manifest.agent_list())
    names = [a.name for a in agents]
    by_meaning = [a for a in agents if semantic_threshold is not None or a.semantic_threshold is not None]
    responses = ResponseCache(store.root / "cache" / "responses.sqlite", l1_ttl=cache_ttl, l2_ttl=disk_cache_ttl) \
        if cache else None
    if responses is not None and responses.warning:
        click.echo(f"edgepack: warning: {responses.warning}", err=True)
    per_token = {a.model: tpot_target / 1000 for a in agents} if tpot_target is not None \
        else tpot_targets(agents, config.max_tokens)
    service = Service(
        make_pool, agents, preload=preload, tpot_targets=per_token,
        default_max_tokens=config.max_tokens, adapter_scales={a.name: a.scale for a in served.adapters},
        max_queue=max_queue, request_timeout=request_timeout,
        cache=responses,
        semantic=SemanticCache(semantic_threshold or DEFAULT_THRESHOLD, ttl=max(cache_ttl, 1.0)) if by_meaning
        else None,
        semantic_all=semantic_threshold is not None,
        agent_digests={a.name: manifest.agent_digest(a) for a in agents},
        cors_origins=tuple(o.strip() for o in cors_origins.split(",") if o.strip()),
        api_keys=api_keys, metrics_open=metrics_open,
        on_ready=on_ready, on_failure=on_failure,
        on_warning=lambda message: click.echo(f"edgepack: warning: {message}", err=True),
        on_stopped=(lambda: boot_count.reset(store, store.release_id())) if max_unstable_starts else lambda: None,
        trial=trial,
    )
    if trial is not None:
        trial.set_switch(service.switch_to_candidate)
        click.echo(f"edgepack: candidate {trial.release} ({trial.candidate.name} v{trial.candidate.bundle_version}) "
                   f"on trial: {trial.mode}, shadow {', '.join(f'{a} {r:.0%}' for a, r in trial.rates.items())}, "
                   f"A/B {trial.ab_rate:.0%}, {'auto-promoted' if trial.auto_promote else 'reported ready'} after "
                   f"{min_decisions} decisions per agent",
                   err=True)
    click.echo(f"edgepack: loading {manifest.name} v{manifest.bundle_version} on {urls}", err=True)
    if api_keys:
        click.echo(f"edgepack: {len(api_keys.keys)} API key(s) from {', '.join(api_keys.sources)}; /health "
                   f"{'and /metrics are' if metrics_open else 'is'} open", err=True)
    elif not all(is_loopback(address) for address in parse_hosts(host)):
        click.echo(f"edgepack: warning: {urls} without an API key: anyone who reaches it may use it "
                   "(--api-key-file, docs/operations.md)", err=True)
    if lowered:
        click.echo(f"edgepack: warning: {lowered}", err=True)
    click.echo(f"edgepack: memory budget {format_mib(budget.bytes)} ({budget.reason}); models load "
               f"{'now' if preload else 'on first request'}, idle ones are evicted after "
               f"{'never' if keep is None else f'{keep:g}s'}", err=True)
    if threads is None and "threads" in local:
        click.echo(f"edgepack: {config.threads} threads (local.json, from `edgepack tune`)", err=True)
    elif threads is None:
        from .hardware import thread_plan

        plan = thread_plan()
        click.echo(f"edgepack: {config.threads} threads ({plan.reason}: CPUs {list(plan.cpus)})", err=True)
    server = uvicorn.Server(
        uvicorn.Config(service.app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                       **limits.uvicorn_settings())
    )
    server.run(sockets=sockets)
    if service.error:
        raise EdgepackError(service.error)
    if not server.started:
        raise EdgepackError(f"the server did not start on {urls}")


def parse_hosts(text: str) -> list[str]:
    """'127.0.0.1,::1' / '[::1]' -> the addresses to listen on."""
    hosts = [h.strip().removeprefix("[").removesuffix("]") for h in text.split(",") if h.strip()]
    if not hosts:
        raise EdgepackError(f"--host {text!r}: expected one or more addresses, comma-separated")
    return hosts


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(hosts: str, port: int) -> list[socket.socket]:
    """A listening socket on each of the comma-separated hosts (their first address), or EdgepackError naming
    the one that failed (the others are closed)."""
    from .http_guard import BACKLOG

    sockets: list[socket.socket] = []
    try:
        for host in parse_hosts(hosts):
            try:
                family, kind, proto, _, address = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # '::' alone, not IPv4 too: '0.0.0.0,::' binds both
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(BACKLOG)
            except OSError as exc:
                raise EdgepackError(f"could not listen on {url(host, port)}: {exc.strerror or exc}") from None
    except EdgepackError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def parse_stages(text: str) -> frozenset[str]:
    """'singles,batch' / 'none' -> the warm-up stages to run."""
    from .warmup import WARMUP_STAGES

    stages = frozenset(s.strip() for s in text.split(",") if s.strip() and s.strip() != "none")
    if not stages <= WARMUP_STAGES:
        raise EdgepackError(f"--warmup {text!r}: expected stages among {', '.join(sorted(WARMUP_STAGES))}, or none")
    return stages


def parse_duration(text: str) -> float | None:
    """'30s', '5m', '1h', '90' (seconds) -> seconds; '-1' / 'never' -> None (keep loaded)."""
    value = text.strip().lower()
    if value in ("-1", "never", "forever"):
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (value[:-1], units[value[-1]]) if value and value[-1] in units else (value, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise EdgepackError(f"--keep-alive {text!r}: expected a duration like 30s, 5m, 1h, or -1 for never")
    return seconds


@cli.command()
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="The server to ask.")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="A file of API keys (its first is sent) for a server that requires one; also $EDGEPACK_API_KEYS.")
def status(url: str, api_key_file: Path | None) -> None:
    """Show a running server's state: requests, latency percentiles, slots, caches, memory, alerts."""
    from .auth import load_api_keys
    from .status import summary

    keys = load_api_keys(api_key_file).keys
    key = keys[0].decode() if keys else None
    click.echo(format_table([("", "")] + summary(url.rstrip("/"), key))[1:].lstrip("\n"))


@cli.command()
@store_option
@click.argument("prompt")
@click.option("--model", help="Model name (default: the bundle's first).")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 2))
@click.option("--system", help="A system message (chat mode).")
@click.option("--raw", is_flag=True, help="Plain completion of PROMPT, no chat template.")
@click.option("--threads", type=int)
@click.option("--gpu-layers", type=click.IntRange(-1), help="As serve's --gpu-layers.")
def run(store_dir: Path, prompt: str, model: str | None, max_tokens: int, temperature: float,
        system: str | None, raw: bool, threads: int | None, gpu_layers: int | None) -> None:
    """Generate once from PROMPT and print the answer."""
    from .engine import Engine, Generation, Sampling

    store = Store(store_dir)
    manifest = store.manifest()
    info = manifest.model(model)
    config = resolve_config(manifest, threads, local=read_local_config(store), gpu_layers=gpu_layers)
    engine = Engine(store.segment_paths(manifest, info.name), name=info.name, n_ctx=config.n_ctx,
                    n_batch=config.n_batch, threads=config.threads, chat_template=info.chat_template,
                    gpu_layers=config.gpu_layers)
    try:
        messages = ([("system", system)] if system else []) + [("user", prompt)]
        text = prompt if raw else engine.format_chat(messages)
        result = Generation()
        for piece in engine.generate(engine.tokenize(text), Sampling(max_tokens, temperature=temperature), result):
            click.echo(piece, nl=False)
        click.echo()
        rate = result.decode_tokens_per_second
        click.echo(f"[{result.completion_tokens} tokens, {rate or 0:.1f} tok/s, {result.finish_reason}]", err=True)
    finally:
        engine.close()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def boards(as_json: bool) -> None:
    """List the board profiles (and this host's generic profile)."""
    profiles = list_boards() + [host_profile()]
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(profiles), indent=2))
        return
    rows = [("BOARD", "ARCH", "CORES", "SIMD", "MEMORY", "QUANT", "THREADS")]
    for p in profiles:
        rows.append((p.name, p.arch, p.core_summary, ",".join(p.simd), f"{p.memory_gib:g} GiB", p.default_quant,
                     str(p.threads or "auto")))
    click.echo(format_table(rows))


cli.add_command(promote)
cli.add_command(reject)


def _add_host_commands() -> None:
    # Without the host extra (a board) the packager is not imported at all: it would load llama.cpp for every
    # command, and doctor must run even where the installed llama.cpp cannot load.
    if importlib.util.find_spec("gguf") is None:
        return
    try:
        host = importlib.import_module("edgepack.packager.cli")
    except ModuleNotFoundError as exc:  # a device install without the host extra
        if exc.name not in ("gguf", "edgepack.packager"):
            raise
        return
    host.register(cli)


def main() -> None:
    _add_host_commands()
    cli(prog_name="edgepack")


if __name__ == "__main__":
    sys.exit(main())
