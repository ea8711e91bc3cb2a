"""Label and annotation keys on the objects branchmerge creates or reads: what a kubectl selector, the chart's
RBAC, Kueue and both control planes agree on. Names built from them live in operator/naming.py."""
from __future__ import annotations

from .common import GROUP

# Labels on every child (and on pods through the Job template).
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "branchmerge-operator"
LABEL_KIND = f"{GROUP}/kind"
LABEL_NAME = f"{GROUP}/name"
LABEL_RUN = f"{GROUP}/run"  # the run hash: identity of the resolved spec
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_JOB = f"{GROUP}/job"  # on pods: the Job they belong to (selector of the headless Service)
# On a MergeSearch's child CRs: the search they belong to, and on trial children the trial id (a reference Eval
# has "reference"); both control planes and the report select children by them.
LABEL_SEARCH = f"{GROUP}/search"
LABEL_TRIAL = f"{GROUP}/trial"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"  # on the Workload Kueue makes for a Job
# On the run's ConfigMap: the final result of the run (compact JSON), the durable record after Job TTL.
ANNOTATION_RESULT = f"{GROUP}/result"
# On a CR: which Secret (name or name/key) holds the Hugging Face token for hf:// staging.
ANNOTATION_HF_SECRET = f"{GROUP}/hf-token-secret"
# On a CR: a new value asks for one more run of a finished CR (see operator/plan.py; any string, e.g. a date).
ANNOTATION_RERUN = f"{GROUP}/rerun"
