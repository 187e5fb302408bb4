"""Workflows run in Temporal's sandbox, which re-imports a workflow's module for every new run.

Every module of ours that a workflow imports -- contracts, options, saga, failover, domain -- is
imported inside `workflow.unsafe.imports_passed_through()`, so it is loaded once per worker
rather than once per run (py-spy on `make bench`: the sandbox's share of the worker's busy samples
went from 22% to 16% when the helpers joined the contracts there). Passed-through modules must
stay deterministic and keep no mutable module state.
"""
