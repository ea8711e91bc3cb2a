{{/* RBAC rules, least privilege: only the verbs the operator uses. Equal to deploy/rbac/ (a test compares
     them; the operator's integration tests check every request it makes against deploy/rbac/). */}}
{{- define "branchmerge.namespacedRules" -}}
# The five kinds: watched (kopf list+watch); only their status is written, never the spec.
- apiGroups: ["branchmerge.dev"]
  resources: ["teachergens", "branchsfts", "merges", "evals", "mergesearches"]
  verbs: ["list", "watch"]
- apiGroups: ["branchmerge.dev"]
  resources: ["teachergens/status", "branchsfts/status", "merges/status", "evals/status", "mergesearches/status"]
  verbs: ["patch"]
# A MergeSearch's trials: owned Merge and Eval CRs the operator creates (never edits another's spec).
- apiGroups: ["branchmerge.dev"]
  resources: ["merges", "evals"]
  verbs: ["create"]
# ownerReferences with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
- apiGroups: ["branchmerge.dev"]
  resources: ["teachergens/finalizers", "branchsfts/finalizers", "merges/finalizers", "evals/finalizers",
              "mergesearches/finalizers"]
  verbs: ["update"]
# Children: one Job per attempt (suspended/resumed by patch, deleted when a spec edit supersedes it),
# the run's ConfigMap (resolved spec and result record), a headless Service for multi-pod runs.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
# Termination messages (results, exit codes, OOMKilled, DisruptionTarget) of finished attempts (list); the
# pod behind a live progress report, whose owner chain must lead to a CR's Job (get).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# Kueue: a queued run is suspended and resumed through its Workload's spec.active (Kueue owns the Job's suspend).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
{{- end }}

{{- define "branchmerge.namespacedPeeringRules" -}}
# kopf peering within a namespace (namespaced mode).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch", "get"]
{{- end }}

{{- define "branchmerge.clusterOnlyRules" -}}
# kopf peering across the cluster. No CRD or namespace watching: the operator disables kopf's scanning
# (the CRDs are installed before it starts), so it needs no cluster-wide read access beyond its kinds.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch", "get"]
{{- end }}


{{/* Cluster-scoped in every mode: TokenReview has no namespace. The operator checks the token of each live
     progress report (a stage pod's projected token, audience branchmerge.dev/progress) with it. */}}
{{- define "branchmerge.tokenReviewRules" -}}
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
{{- end }}
