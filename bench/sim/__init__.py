"""The simulator (a changing fleet of vLLM-like replicas on calibrated step times) and what
runs on it: load sweeps, SLO goodput, autoscaling evaluation, capacity planning."""
