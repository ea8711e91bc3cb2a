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
{{- if .Values.trainer.progress.enabled }}
- {{ printf "--progress-url=%s" (include "branchmerge.progressUrl" .) | quote }}
- {{ printf "--progress-port=%v" .Values.trainer.progress.port | quote }}
- {{ printf "--progress-interval=%v" .Values.trainer.progress.interval | quote }}
{{- end }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Where stage pods reach the operator's progress endpoint: its Service (templates/service.yaml), by DNS name. */}}
{{- define "branchmerge.progressUrl" -}}
{{- printf "http://%s.%s.svc:%v/progress" (include "branchmerge.fullname" .) .Release.Namespace .Values.trainer.progress.port }}
{{- end }}
