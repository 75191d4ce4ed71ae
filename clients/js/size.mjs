// The size budget: the SDK bundled with its dependencies (msgpack), minified and
// gzipped, must stay under BUDGET bytes. Run by `npm test` (and so by CI).
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const BUDGET = 20_000; // bytes, min+gzip

const result = await build({
  entryPoints: [new URL("./src/index.ts", import.meta.url).pathname],
  bundle: true,
  minify: true,
  format: "esm",
  platform: "neutral",
  target: "es2022",
  mainFields: ["module", "main"],
  write: false,
  metafile: true,
});
const code = result.outputFiles[0].contents;
const gzipped = gzipSync(code, { level: 9 }).length;
const inputs = Object.entries(result.metafile.outputs)[0][1].inputs;
const msgpack = Object.entries(inputs)
  .filter(([path]) => path.includes("@msgpack"))
  .reduce((sum, [, input]) => sum + input.bytesInOutput, 0);
console.log(
  `dongne-client: ${code.length} bytes minified (msgpack ${msgpack}), ${gzipped} bytes min+gzip; budget ${BUDGET}`,
);
if (gzipped > BUDGET) {
  console.error(`over the size budget by ${gzipped - BUDGET} bytes`);
  process.exit(1);
}
