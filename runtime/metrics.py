"""Prometheus metrics of the server (exposed at GET /metrics by prometheus-client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "edgepack_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "edgepack_request_duration_seconds", "Time from request to the last byte of the response",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "edgepack_time_to_first_token_seconds", "Time from request to the first generated token",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "edgepack_time_per_output_token_seconds", "Decode time per generated token of a request",
            ["model"], buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2), registry=r,
        )
        self.alert = Gauge("edgepack_alert", "1 while an alert condition holds (see docs/operations.md)", ["alert"],
                           registry=r)
        self.generated = Counter("edgepack_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt = Counter("edgepack_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.cancelled = Counter(
            "edgepack_generations_cancelled", "Generations stopped because the client went away", ["model"],
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "edgepack_decode_tokens_per_second", "Decode rate of the last finished generation", ["model"], registry=r
        )
        self.in_flight = Gauge("edgepack_requests_in_flight", "HTTP requests being served", registry=r)
        self.queued = Gauge("edgepack_queue_depth", "Generations waiting for a slot", ["model"], registry=r)
        self.active_slots = Gauge("edgepack_active_slots", "Generations being decoded together", ["model"],
                                  registry=r)
        self.cache_requests = Counter(
            "edgepack_cache_requests", "Deterministic requests by cache outcome (l1, l2, semantic hit or miss)",
            ["result"], registry=r,
        )
        self.embedding_seconds = Histogram(
            "edgepack_embedding_seconds", "Time to embed a request for the semantic cache",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2), registry=r,
        )
        self.semantic_similarity = Histogram(
            "edgepack_semantic_cache_similarity", "Cosine similarity of semantic cache hits",
            buckets=(0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0), registry=r,
        )
        self.semantic_entries = Gauge("edgepack_semantic_cache_entries", "Answers held by the semantic cache",
                                      registry=r)
        self.ready = Gauge("edgepack_ready", "1 when the server takes requests (models preloaded if asked)",
                           registry=r)
        self.prompt_cached = Counter(
            "edgepack_prompt_cached_tokens", "Prompt tokens whose KV state was reused (prefix cache)", ["model"],
            registry=r,
        )
        # memory and the model pool
        self.rss = Gauge("edgepack_process_resident_memory_bytes", "Resident memory of the server (RSS)", registry=r)
        self.pss = Gauge("edgepack_process_proportional_memory_bytes",
                         "Proportional set size (shared pages split between their users)", registry=r)
        self.system_cpu = Gauge("edgepack_system_cpu_percent", "System CPU use, last 5 s sample", registry=r)
        self.system_memory = Gauge("edgepack_system_memory_percent", "System memory in use", registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        self.memory_budget = Gauge("edgepack_memory_budget_bytes", "The memory budget models are loaded within",
                                   registry=r)
        self.memory_estimate = Gauge("edgepack_memory_estimate_bytes",
                                     "What the pool accounts as used: process base, mapped weights once, contexts",
                                     registry=r)
        self.model_loaded = Gauge("edgepack_model_loaded", "1 while the model is loaded", ["model"], registry=r)
        self.loads = Counter("edgepack_model_loads", "Model loads (first request, preload or after eviction)",
                             ["model"], registry=r)
        self.load_seconds = Histogram(
            "edgepack_model_load_seconds", "Time to load and warm up a model (a cold start)", ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60), registry=r,
        )
        self.evictions = Gauge("edgepack_model_evictions", "Models evicted (keep_alive or to make room)", registry=r)
        self.warmup_latency = Gauge(
            "edgepack_warmup_latency_seconds",
            "Warm-up latencies of the last load: cold (first generation), warm (median of the next), "
            "concurrent_ttft (slowest first token of the concurrent stage)", ["model", "stage"], registry=r,
        )
        # adaptive batching
        self.slot_limit = Gauge("edgepack_slot_limit", "Slots the adaptive controller lets decode together",
                                ["model"], registry=r)
        self.tpot_target = Gauge("edgepack_tpot_target_seconds", "Time per output token the controller aims under",
                                 ["model"], registry=r)
        self.step_p95 = Gauge("edgepack_decode_step_p95_seconds",
                              "p95 decode step time (= time per output token) of the controller's last window",
                              ["model"], registry=r)

        self.shadow_requests = Counter(
            "edgepack_shadow_requests", "Live requests replayed on the candidate release, by agent and result (agree, "
            "disagree, error, skipped, repeat: a greedy request already compared)", ["agent", "result"], registry=r)
        self.shadow_agreement = Gauge("edgepack_shadow_agreement_ratio",
                                      "Share of the candidate's compared decisions that agree with the live release",
                                      ["agent"], registry=r)
        self.shadow_tier_limit = Gauge("edgepack_shadow_tier_limit",
                                       "Largest share of decisions the agent's tolerance tier lets a candidate change",
                                       ["agent"], registry=r)
        self.trial_latency = Histogram(
            "edgepack_trial_request_duration_seconds", "Answer time of non-streamed requests during a candidate's "
            "trial: live, candidate (A/B) and shadow (the candidate's replays)", ["arm"], buckets=_LATENCY_BUCKETS,
            registry=r)
        self.candidate = Gauge("edgepack_candidate_info", "1 for the candidate release and its mode (shadow, ab, "
                               "shadow+ab, ready, promoted, rejected, failed, rolled back)", ["release", "mode"],
                               registry=r)

        self.spec_drafted = Counter("edgepack_spec_drafted_tokens", "Tokens drafted for speculative decoding and "
                                    "verified", ["model", "agent"], registry=r)
        self.spec_accepted = Counter("edgepack_spec_accepted_tokens", "Drafted tokens the model kept",
                                     ["model", "agent"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
