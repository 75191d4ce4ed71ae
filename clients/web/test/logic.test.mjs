// The app's logic that needs no browser: routes, hashtags, regions, distances, strings.
// The TypeScript is bundled on the fly (esbuild, as the build does) and imported from memory.
import { build } from "esbuild";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { before, test } from "node:test";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const web = resolve(here, "..");
let m;

before(async () => {
  const out = await build({
    stdin: {
      contents: `
        export { parseRoute, href, shared, store } from "./src/app.ts";
        export { haversine, regionAt, regionCentre } from "./src/geo.ts";
        export { t, distance, hasKey } from "./src/i18n.ts";
        export { invalidTag, parseTags, sameText } from "./src/screens/ask.ts";
        export { mayHaveApplied } from "./src/sent.ts";
        export { ConnectionLost, RequestError, RequestTimeout, SessionClosed } from "./src/api.ts";
        export { VIBRATION } from "./src/signal.ts";
        export { createStore } from "./src/store.ts";`,
      resolveDir: web,
      loader: "ts",
    },
    bundle: true,
    format: "esm",
    platform: "node",
    write: false,
    logLevel: "warning",
    plugins: [{
      name: "dongne-client-source",
      setup(b) { b.onResolve({ filter: /^dongne-client$/ }, () => ({ path: resolve(web, "../js/src/index.ts") })); },
    }],
  });
  m = await import(`data:text/javascript;base64,${Buffer.from(out.outputFiles[0].contents).toString("base64")}`);
  m.shared.regions = JSON.parse(readFileSync(resolve(web, "../../dongne/data/jeju_regions.geojson"), "utf8"));
});

test("routes: a question by id, each screen by name, anything else home", () => {
  assert.deepEqual(m.parseRoute("#/q/q01a21c02a1ef752cf21a", false), { name: "q", id: "q01a21c02a1ef752cf21a" });
  assert.deepEqual(m.parseRoute("#/inbox", true), { name: "inbox" });
  assert.deepEqual(m.parseRoute("", false), { name: "ask" });
  assert.deepEqual(m.parseRoute("", true), { name: "nearby" });
  assert.deepEqual(m.parseRoute("#/q", false), { name: "ask" });
  assert.deepEqual(m.parseRoute("#/nowhere", true), { name: "nearby" });
  assert.equal(m.href({ name: "q", id: "a/b" }), "#/q/a%2Fb");
  assert.deepEqual(m.parseRoute(m.href({ name: "q", id: "a/b" }), false), { name: "q", id: "a/b" });
});

test("hashtags: split on spaces and commas, '#' dropped, repeats removed, at most 5", () => {
  assert.deepEqual(m.parseTags("#food, 맛집  beach #food"), ["food", "맛집", "beach"]);
  assert.deepEqual(m.parseTags("  "), []);
  assert.deepEqual(m.parseTags("a b c d e f g"), ["a", "b", "c", "d", "e", "f", "g"]); // refused on submit, not cut
  assert.deepEqual(m.parseTags("#Food food FOOD"), ["food"]); // lower case, as the server stores them
});

test("hashtags: the server's rule (1-30 of a-z, 0-9, '_', Hangul) is checked before sending, naming the bad one", () => {
  assert.equal(m.invalidTag(m.parseTags("#food #맛집 bus_stop #ㅋㅋ x2")), null);
  assert.equal(m.invalidTag(m.parseTags("#food #bus-stop")), "bus-stop");
  assert.equal(m.invalidTag(m.parseTags("#café")), "café");
  assert.equal(m.invalidTag(m.parseTags("#food!")), "food!");
  assert.equal(m.invalidTag(m.parseTags("#日本")), "日本");
  assert.equal(m.invalidTag(["a".repeat(30)]), null);
  assert.equal(m.invalidTag(["a".repeat(31)]), "a".repeat(31));
});

test("a request sent and unanswered may have been applied: a drop after sending and a timeout; not a refusal", () => {
  assert.equal(m.mayHaveApplied(new m.RequestTimeout("no reply to 'create_question' within 10000 ms")), true);
  assert.equal(m.mayHaveApplied(new m.ConnectionLost("dropped", true)), true);
  assert.equal(m.mayHaveApplied(new m.ConnectionLost("not sent", false)), false);
  assert.equal(m.mayHaveApplied(new m.RequestError({ code: "question_closed", message: "closed" })), false);
  assert.equal(m.mayHaveApplied(new m.SessionClosed("over", 4003, "banned")), false);
});

test("regions: Jeju City, Seongsan; the sea and Seoul are outside", () => {
  assert.equal(m.regionAt({ lat: 33.4996, lng: 126.5312 })?.properties.name, "Jeju-si");
  assert.equal(m.regionAt({ lat: 33.4585, lng: 126.941 })?.properties.name, "Seongsan");
  assert.equal(m.regionAt({ lat: 33.2, lng: 126.2 }), null);
  assert.equal(m.regionAt({ lat: 37.5665, lng: 126.978 }), null); // Seoul
});

test("each region's stand-in point (the region picker's) lies inside it", () => {
  assert.equal(m.shared.regions.features.length, 15);
  for (const f of m.shared.regions.features) {
    assert.equal(m.regionAt(m.regionCentre(f))?.properties.name, f.properties.name, f.properties.name);
  }
});

test("distances: the test's traveller and local are 800 m apart", () => {
  const d = m.haversine({ lat: 33.4996, lng: 126.5312 }, { lat: 33.4996, lng: 126.5398 });
  assert.ok(Math.abs(d - 800) < 10, String(d));
  m.store.set({ lang: "en" });
  assert.equal(m.distance(780), "780 m");
  assert.equal(m.distance(1850), "1.9 km");
  m.store.set({ lang: "ko" });
});

test("strings: Korean by default, English on switch, {vars} filled", () => {
  assert.equal(m.store.get().lang, "ko");
  assert.equal(m.t("locals_count", { n: 3 }), "3명");
  m.store.set({ lang: "en" });
  assert.equal(m.t("err_rate_limited", { s: 2 }), "Too fast. Try again in 2 s.");
  m.store.set({ lang: "ko" });
});

test("strings: every error code PROTOCOL.md lists has a message in both languages", () => {
  const protocol = readFileSync(resolve(web, "../../PROTOCOL.md"), "utf8");
  const table = protocol.split("\n## Error codes\n")[1].split("\n## ")[0];
  const codes = [...table.matchAll(/^\| `([a-z_]+)` \|/gm)].map((match) => match[1]);
  assert.ok(codes.includes("conflict") && codes.length >= 15, `codes read: ${codes}`);
  for (const lang of ["ko", "en"]) {
    m.store.set({ lang });
    for (const code of codes) {
      assert.ok(m.hasKey(`err_${code}`), `no err_${code}`);
      assert.ok(m.t(`err_${code}`), `err_${code} is empty in ${lang}`);
    }
  }
  m.store.set({ lang: "ko" });
});

test("vibration: strong is long and repeated, light one short buzz", () => {
  assert.deepEqual(m.VIBRATION.strong, [400, 150, 400, 150, 600]); // tests/test_web_app.py's STRONG
  assert.deepEqual(m.VIBRATION.light, [150]);
});

test("the store: a patch, subscribers with the previous state, unsubscribe", () => {
  const s = m.createStore({ a: 1, b: 2 });
  const seen = [];
  const off = s.subscribe((now, prev) => seen.push([prev.a, now.a, now.b]));
  s.set({ a: 5 });
  off();
  s.set({ a: 6 });
  assert.deepEqual(seen, [[1, 5, 2]]);
  assert.deepEqual(s.get(), { a: 6, b: 2 });
});

test("a question posted while its reply was lost is found by its text as the server stores it", () => {
  const nfd = "\u1106\u1161\u11ba\u110c\u1175\u11b8"; // 맛집, decomposed (as some keyboards and pastes give it)
  assert.ok(m.sameText("맛집 추천", `${nfd} 추천`));
  assert.ok(m.sameText("Best noodles?", "Best\u200b noodles?"));
  assert.ok(m.sameText("Best noodles?", "<b>Best</b> noodles?"));
  assert.ok(m.sameText("Fish & chips", "Fish &amp; chips"));
  assert.ok(m.sameText("A < B", "A &#60; B"));
  assert.ok(!m.sameText("Best noodles?", "Best ramen?"));
});
