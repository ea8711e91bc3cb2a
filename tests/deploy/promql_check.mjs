// Parse PromQL expressions with Prometheus' own grammar (@prometheus-io/lezer-promql) and report syntax errors.
// stdin: JSON list of expressions; stdout: JSON list of {expr, errors: [offset...]} for the ones that fail.
import { parser } from "@prometheus-io/lezer-promql";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const exprs = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const failures = [];
for (const expr of exprs) {
  const errors = [];
  parser.parse(expr).iterate({
    enter(node) {
      if (node.type.isError) errors.push(node.from);
    },
  });
  if (errors.length) failures.push({ expr, errors });
}
process.stdout.write(JSON.stringify(failures));
