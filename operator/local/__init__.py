"""The embedded control plane: ``branchmerge run -f DIR`` on one machine.

It drives the same stage entry point as the Kubernetes operator (``branchmerge stage ...``) as local
subprocesses, keeps a status per CR in the workdir with the operator's status model, caches finished
stages (KFP-style: same resolved spec + same input digests) and renders progress and an HTML report.
"""
