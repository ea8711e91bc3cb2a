"""TeacherGen: a teacher writes traces for prompts; they are verified, filtered, sharded, committed and published.

Published folder (``spec.output.uri``)::

    data.jsonl        one kept sample per line, sorted by (promptId, sampleIndex):
                      {"promptId", "sampleIndex", "messages": [system?, user, assistant] (BranchSFT-ready),
                       "verdict": {"correct", "reason", "extracted"} | null, "numTokens", "finishReason",
                       "meta": {<prompts.fields>}?}
    teachergen.json   counts, acceptance (kept fraction, rejections by reason, verdicts, one example message
                      per engine rejection reason, e.g. the server's 400), token totals,
                      teacher engine/model, template, system prompt, sampling, verify/select/filters, spec digest
    _manifest.json    sha256 of every file (api/outputs.py)

Modules: ``prompts`` (load, ids, template), ``selection`` (filters and select modes), ``store`` (committed
batches per shard), ``stage`` (the run: shards, workers, resume, publish).
"""
