// package.json: the package resolves by its name under every condition, also
// require() (CommonJS tools such as Jest), and says it is an ES module.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"));
const dist = fileURLToPath(new URL("../dist/index.js", import.meta.url));

test("the package resolves by name for require() (the `default` export condition), not only for import", async () => {
  // Self-reference: inside the package, its own name resolves through `exports`.
  const require = createRequire(import.meta.url);
  assert.equal(require.resolve(pkg.name), dist);
  assert.equal(fileURLToPath(import.meta.resolve(pkg.name)), dist);
  assert.equal(pkg.type, "module", "ESM only: dist/index.js is an ES module");
  const conditions = pkg.exports["."];
  assert.equal(conditions.default, "./dist/index.js");
  assert.equal(Object.keys(conditions).at(-1), "default", "`default` must come last: conditions are matched in order");
  assert.equal(Object.keys(conditions)[0], "types", "`types` must come first");
  const mod = await import(pkg.name);
  assert.equal(typeof mod.connect, "function");
});
