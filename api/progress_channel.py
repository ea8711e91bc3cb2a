"""The contract of the progress channel between stage pods and the operator (operator/progress_api.py
serves it, trainer/progress_k8s.py sends to it): where a pod finds the endpoint and its token."""

AUDIENCE = "branchmerge.dev/progress"  # the projected token's audience: good for this endpoint only
TOKEN_DIR = "/var/run/secrets/branchmerge"  # the projected serviceAccountToken volume's mountPath
TOKEN_FILE = f"{TOKEN_DIR}/token"
URL_ENV = "BRANCHMERGE_PROGRESS_URL"  # e.g. http://branchmerge-operator.branchmerge-system.svc:8081/progress
INTERVAL_ENV = "BRANCHMERGE_PROGRESS_INTERVAL"  # seconds between two reports of one pod
