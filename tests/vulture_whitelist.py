"""Names vulture reports as unused that a framework calls: read (never run) by tests/test_dead_code.py.
Each says who calls it."""
# ruff: noqa
ignore_aliases  # PyYAML's Dumper hook (branchmerge/commands/render.py)
fetch  # kopf's DiffBaseStorage and ProgressStorage interface (operator/controller.py)
purge  # kopf's ProgressStorage interface (operator/controller.py)
collect  # prometheus_client's custom-collector interface (operator/metrics.py)
_store  # registered by numba's @overload(store) (trainer/merge/kernels.py)
_value  # registered by numba's @overload(value) (trainer/merge/kernels.py)
typingctx  # numba's @intrinsic signature (trainer/merge/kernels.py)
frame  # a signal handler's signature (signum, frame)
