"""Admission control for a shared API (Ray-free): per-tenant limits kept in Redis
(`limiter`), the fair queue per pool at saturation (`fair_queue`), the tenant's prefix-cache
salt (`cache_salt`) and the OpenAI rate-limit headers (`headers`). The gateway's steps
(cluster.gateway.steps.admit, .fair_share, .isolate) apply them to requests."""
