// dist/ is committed (a backend can copy dist/index.js, or depend on this folder, without a build
// step), so it must be what `npm run build` makes from src/. `npm test` compiles to build/.
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { test } from "node:test";

const here = (p) => new URL(`../${p}`, import.meta.url);

test("the committed dist/ is what `npm run build` produces from src/", () => {
  const built = readdirSync(here("build")).sort();
  assert.deepEqual(readdirSync(here("dist")).sort(), built, "dist/ and build/ hold the same files");
  for (const file of built) {
    assert.ok(
      readFileSync(here(`dist/${file}`), "utf8") === readFileSync(here(`build/${file}`), "utf8"),
      `dist/${file} is stale: run \`npm run build --prefix clients/agones-scheduler\` and commit dist/`,
    );
  }
});

test("no runtime dependencies: only node: built-ins are imported", () => {
  const pkg = JSON.parse(readFileSync(here("package.json"), "utf8"));
  assert.equal(pkg.dependencies, undefined);
  const imports = [...readFileSync(here("dist/index.js"), "utf8").matchAll(/^import .* from "([^"]+)";$/gm)].map((m) => m[1]);
  assert.ok(imports.length > 0);
  for (const i of imports) assert.match(i, /^node:/);
});
