"""Operator tools, apart from the serving core: the `cluster` CLI, the local runner, the
Helm values render and `cluster doctor`."""
