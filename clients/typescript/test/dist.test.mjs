// dist/ is committed (the dev board includes dist/index.js, so that it needs
// nothing but cargo): it must be exactly what tsc produces from src/. `npm test` compiles src/ to
// build/ first (same tsconfig, same pinned tsc); this compares the two.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";

const here = (path) => new URL(`../${path}`, import.meta.url);

test("the committed dist/ is what `npm run build` produces from src/", () => {
  const built = readdirSync(here("build")).sort();
  assert.deepEqual(readdirSync(here("dist")).sort(), built, "dist/ and build/ hold the same files");
  for (const file of built) {
    assert.ok(
      readFileSync(here(`dist/${file}`), "utf8") === readFileSync(here(`build/${file}`), "utf8"),
      `dist/${file} is stale: run \`npm run build --prefix clients/typescript\` and commit dist/`,
    );
  }
});

test("dist/index.js marks itself as generated", () => {
  assert.match(readFileSync(here("dist/index.js"), "utf8").slice(0, 1000), /dist\/ is GENERATED from this file by `npm run build`/);
});
