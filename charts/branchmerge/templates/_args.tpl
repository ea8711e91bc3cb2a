{{/* Command line of `branchmerge operator` (a YAML list). Trainer defaults travel as flags. */}}
{{- define "branchmerge.operatorArgs" -}}
- operator
{{- $namespaces := include "branchmerge.watchNamespaces" . | fromJsonArray }}
{{- range $namespaces }}
- {{ printf "--namespace=%s" . | quote }}
{{- else }}
- --all-namespaces
{{- end }}
- {{ printf "--peering=%s" .Values.peering.name | quote }}
- {{ printf "--liveness=http://0.0.0.0:%v/healthz" .Values.operator.livenessPort | quote }}
- {{ printf "--metrics-port=%v" (ternary .Values.metrics.port 0 .Values.metrics.enabled) | quote }}
- {{ printf "--workers=%v" .Values.operator.workers | quote }}
- {{ printf "--image=%s" (include "branchmerge.image" (list .Values.trainer.image .)) | quote }}
{{- with .Values.trainer.defaultOutputRoot }}
- {{ printf "--default-output-root=%s" . | quote }}
{{- end }}
{{- with .Values.trainer.hfTokenSecret }}
- {{ printf "--hf-token-secret=%s" . | quote }}
{{- end }}
{{- with .Values.trainer.stagingClaim }}
- {{ printf "--staging-claim=%s" . | quote }}
{{- end }}
{{- with .Values.trainer.defaultRequests.cpu }}
- {{ printf "--default-cpu-request=%s" . | quote }}
{{- end }}
{{- with .Values.trainer.defaultRequests.memory }}
- {{ printf "--default-memory-request=%s" . | quote }}
{{- end }}
{{- if include "branchmerge.progressOn" . }}
- {{ printf "--progress-service-account=%s" .Values.trainer.progress.serviceAccountName | quote }}
{{- end }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Live progress only where every stage pod finds its ServiceAccount: namespaced (the chart creates it in
     each watched namespace), or cluster-wide once the administrator says every namespace has it. */}}
{{- define "branchmerge.progressOn" -}}
{{- if and .Values.trainer.progress.enabled (or (not .Values.watch.allNamespaces) .Values.trainer.progress.namespacesPrepared) }}true{{ end }}
{{- end }}
