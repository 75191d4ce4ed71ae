// Builds the web app into dongne/web/static (committed; served by dongne on its client port).
//
// Deterministic: the same sources give byte-identical files (esbuild hashes content only, no
// timestamps or absolute paths reach the output), because CI rebuilds and fails on a diff.
// The output directory is flat (the server serves /<name> only): the entry, its lazy chunks
// (Leaflet) and assets all land in it, and files from an earlier build are removed.
//
//   node build.mjs          build, print each file's size (min and gzip)
//   node build.mjs --check  build to memory and fail if it differs from what is on disk
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const here = dirname(fileURLToPath(import.meta.url));
const outdir = resolve(here, "../../dongne/web/static");
const check = process.argv.includes("--check");
// Budgets (gzip bytes) for what a phone downloads before the first screen, and for the lazy map.
const BUDGET = { entry: 40_000, css: 12_000, chunk: 60_000 };

// The SDK is bundled from its TypeScript source, so the app never depends on a stale dist/.
const sdkFromSource = {
  name: "dongne-client-source",
  setup(b) {
    b.onResolve({ filter: /^dongne-client$/ }, () => ({ path: resolve(here, "../js/src/index.ts") }));
  },
};

const result = await build({
  absWorkingDir: here,
  entryPoints: { app: "src/main.ts", style: "src/style.css" },
  bundle: true,
  splitting: true,
  format: "esm",
  target: ["es2022"],
  minify: true,
  sourcemap: false,
  legalComments: "eof",
  charset: "utf8",
  entryNames: "[name]-[hash]",
  chunkNames: "[name]-[hash]",
  assetNames: "[name]-[hash]",
  loader: { ".png": "file", ".svg": "file" },
  plugins: [sdkFromSource],
  metafile: true,
  write: false,
  outdir,
  logLevel: "warning",
});

const files = new Map();
for (const out of result.outputFiles) files.set(basename(out.path), Buffer.from(out.contents));
const outputs = result.metafile.outputs;
const nameOf = (entry) => {
  const hit = Object.entries(outputs).find(([, o]) => o.entryPoint === entry);
  if (!hit) throw new Error(`no output for ${entry}`);
  return basename(hit[0]);
};
const js = nameOf("src/main.ts");
const css = nameOf("src/style.css");
// The CSS entry also yields an empty JS stub when splitting is on: drop it.
for (const name of [...files.keys()]) if (name.startsWith("style-") && name.endsWith(".js")) files.delete(name);

const template = readFileSync(join(here, "index.html"), "utf8");
files.set("index.html", Buffer.from(template.replaceAll("{{APP_JS}}", js).replaceAll("{{APP_CSS}}", css)));
for (const name of readdirSync(join(here, "public"))) files.set(name, readFileSync(join(here, "public", name)));

for (const name of files.keys()) {
  if (!/^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/.test(name)) throw new Error(`not a flat servable name: ${name}`);
}

if (check) {
  const onDisk = existsSync(outdir) ? readdirSync(outdir).sort() : [];
  const built = [...files.keys()].sort();
  const differ = JSON.stringify(onDisk) !== JSON.stringify(built) ||
    built.some((n) => !readFileSync(join(outdir, n)).equals(files.get(n)));
  if (differ) {
    console.error("dongne/web/static differs from a fresh build of clients/web: run `npm run build` and commit it");
    process.exit(1);
  }
  console.log("dongne/web/static matches the sources");
  process.exit(0);
}

mkdirSync(outdir, { recursive: true });
for (const name of readdirSync(outdir)) if (!files.has(name)) rmSync(join(outdir, name));
for (const [name, body] of [...files].sort()) writeFileSync(join(outdir, name), body);

let over = false;
const kb = (n) => (n / 1024).toFixed(1).padStart(6) + " KB";
console.log("file".padEnd(34), "   min", "   gzip");
for (const [name, body] of [...files].sort()) {
  const gz = gzipSync(body, { level: 9 }).length;
  const limit = name === js ? BUDGET.entry : name === css ? BUDGET.css : name.endsWith(".js") ? BUDGET.chunk : Infinity;
  const flag = gz > limit ? `  over budget (${kb(limit).trim()})` : "";
  over ||= gz > limit;
  console.log(name.padEnd(34), kb(body.length), kb(gz) + flag);
}
const digest = createHash("sha256");
for (const [name, body] of [...files].sort()) digest.update(name).update(body);
console.log("build", digest.digest("hex").slice(0, 16));
if (over) process.exit(1);
