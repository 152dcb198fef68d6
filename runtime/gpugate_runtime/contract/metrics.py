"""Names of the metrics the runtime exports and the alert rules and dashboards query.

Ours are `gpugate_*`; vLLM's and Caddy's own names are listed so that rules never
spell a metric differently from the program that exports it.
"""

# authz
AUTHZ_DECISIONS = "gpugate_authz_decisions_total"  # labels: key_id, outcome
AUTHZ_DECISION_SECONDS = "gpugate_authz_decision_seconds"
KEY_AGE_SECONDS = "gpugate_key_age_seconds"  # labels: key_id, name
KEY_LAST_USED = "gpugate_key_last_used_timestamp_seconds"  # labels: key_id
KEYSTORE_RELOADS = "gpugate_keystore_reloads_total"
KEYSTORE_RELOAD_FAILURES = "gpugate_keystore_reload_failures_total"
KEY_BUDGET_USED_RATIO = "gpugate_key_budget_used_ratio"  # labels: family, budget (tokens | usd), period (day | month)
SPEND_RECORDS = "gpugate_spend_records_total"  # route-log records accounted into spend

# prober
PROBE_SUCCESS = "gpugate_probe_success"  # labels: check
PROBE_DURATION = "gpugate_probe_duration_seconds"  # labels: check
TLS_CERT_NOT_AFTER = "gpugate_tls_cert_not_after_timestamp_seconds"
GPU_MEMORY_USED = "gpugate_gpu_memory_used_bytes"  # labels: gpu
GPU_MEMORY_TOTAL = "gpugate_gpu_memory_total_bytes"  # labels: gpu

# NVIDIA DCGM exporter (Kubernetes target: GPU nodes run it; the prober does not run there). MiB.
DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"  # labels: gpu, UUID, Hostname, modelName
DCGM_FB_FREE = "DCGM_FI_DEV_FB_FREE"  # labels: gpu, UUID, Hostname, modelName

# vLLM (0.32, CPU and GPU builds)
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
VLLM_PREEMPTIONS = "vllm:num_preemptions_total"
VLLM_E2E_LATENCY = "vllm:e2e_request_latency_seconds"
VLLM_TTFT = "vllm:time_to_first_token_seconds"
VLLM_PROMPT_TOKENS = "vllm:prompt_tokens_total"
VLLM_GENERATION_TOKENS = "vllm:generation_tokens_total"

# Caddy 2.6
CADDY_REQUEST_DURATION = "caddy_http_request_duration_seconds"  # labels: server, handler, code, method
CADDY_REQUESTS = "caddy_http_requests_total"  # labels: server, handler; every request, errors included
# Caddy 2.6 counts a request that ends in a handler error (e.g. reverse_proxy cannot reach vLLM: 502)
# here and NOT in CADDY_REQUEST_DURATION, so a 5xx ratio needs both.
CADDY_REQUEST_ERRORS = "caddy_http_request_errors_total"  # labels: server, handler

# router (issue 17): the OpenTelemetry GenAI semantic conventions' metrics in Prometheus form, and ours
GENAI_TOKEN_USAGE = "gen_ai_client_token_usage"  # histogram; labels: gen_ai_token_type (input/output), route
GENAI_TTFT = "gen_ai_server_time_to_first_token_seconds"  # histogram; labels: route
ROUTE_REQUESTS = "gpugate_route_requests_total"  # labels: route, tier, provider, policy, outcome
ROUTE_FALLBACKS = "gpugate_route_fallbacks_total"  # labels: from_route, to_route, policy
ROUTE_ERRORS = "gpugate_route_errors_total"  # labels: route, reason (connect, timeout, status_5xx, status_429)
ROUTE_TIER_UP = "gpugate_route_tier_up"  # gauge; labels: tier (0 while the router holds it down)
# Gauges per route (0: never), set by the router as things happen: what `gpugate status` reads a route's state from.
ROUTE_LAST_SUCCESS = "gpugate_route_last_success_timestamp_seconds"  # labels: route; the last answer below 400
ROUTE_LAST_FAILURE = "gpugate_route_last_failure_timestamp_seconds"  # labels: route; the last failed attempt
ROUTE_LAST_FALLBACK = "gpugate_route_last_fallback_timestamp_seconds"  # labels: route; the last request sent on from it
ROUTE_TTFT_AVERAGE = "gpugate_route_ttft_average_seconds"  # labels: route; the moving average cost-optimized compares
