"""Live benchmarks: load replays and fault schedules against a running cluster."""
