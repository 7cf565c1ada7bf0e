"""Benchmarks, by role.

- `bench.sim`: the simulator (a changing fleet of vLLM-like replicas on calibrated step
  times) and what runs on it: load sweeps, TTFT floors and SLO goodput, autoscaling
  evaluation, the capacity planner.
- `bench.calibration`: profilers (GPU layers and all-reduce, published-figure checks) and
  the step-time tables they wrote, read by the simulator.
- `bench.live`: replays and fault schedules against a running cluster.
- `bench.traces` (trace readers and synthetic traces) and `bench.router_latency` (policy
  decision time) serve more than one of these; `bench.cli` registers every benchmark as a
  `cluster bench` subcommand.
"""
