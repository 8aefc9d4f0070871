import assert from "node:assert/strict";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { post, startServer } from "./server_helpers.ts";
import { ROOT } from "./helpers.ts";

const CHROMIUM = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find((p) => {
  try {
    return Deno.statSync(p).isFile;
  } catch {
    return false;
  }
});
if (!CHROMIUM) console.warn("dashboard test skipped: no Chromium (apt-get install chromium)");

/** Where the screenshots are kept for a look by eye: FUSEDGE_SCREENSHOT_DIR, else .tools/artifacts/. */
async function artifacts(): Promise<string> {
  const dir = Deno.env.get("FUSEDGE_SCREENSHOT_DIR") ?? join(ROOT, ".tools", "artifacts");
  await Deno.mkdir(dir, { recursive: true });
  return dir;
}

/** Polls `cond` until it holds; fails after `ms`. */
async function until(cond: () => Promise<boolean>, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${cond}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Width and height from a PNG's IHDR chunk. */
function pngSize(png: Uint8Array): [number, number] {
  assert.deepEqual([...png.subarray(0, 8)], [137, 80, 78, 71, 13, 10, 26, 10], "a PNG signature");
  const v = new DataView(png.buffer, png.byteOffset);
  return [v.getUint32(16), v.getUint32(20)];
}

Deno.test({
  name:
    "dashboard in headless Chromium: model, plan, heatmap, benchmark chart, and a form that swaps the plan",
  ignore: !CHROMIUM,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const ADMIN = "dash-admin-token";
    const server = await startServer(["--device", "wasm", "--admin-token", ADMIN]);
    await server.ready;
    const auth = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    try {
      const bench = await fetch(`${server.base}/bench`, {
        method: "POST",
        headers: auth,
        body: JSON.stringify({ k: 2, tokens: [1, 4], decode_tokens: 4, rounds: 3 }),
      });
      assert.equal(bench.status, 202);
      await bench.body?.cancel();
      for (let i = 0; i < 1200; i++) {
        if ((await (await fetch(`${server.base}/bench`)).json()).status === "done") break;
        await new Promise((r) => setTimeout(r, 100));
      }

      const page = await (await browser.newContext({ viewport: { width: 1200, height: 900 } })).newPage();
      await page.goto(server.base + "/");
      assert.equal(await page.title(), "fusedge");
      assert.match(
        await page.textContent("#model") ?? "",
        /tiny-nas[\s\S]*wasm[\s\S]*fp32, 41\.7 MB[\s\S]*3, 4, 5, 6, 7, 8/,
      );
      assert.equal(await page.textContent("#active-plan"), "unfused");
      assert.ok(await page.isVisible("#bench svg[aria-label='benchmark chart']"));
      assert.equal(
        await page.locator("#bench svg rect[fill='#d0553a']").count(),
        3,
        "legend + one fused bar per T",
      );

      // The analysis with its frontier, started from the page: progress while it runs, then the
      // chart and the heatmap without a reload.
      await page.fill("#token", ADMIN);
      // Steps removed on x until the frontier's speed is measured below.
      await page.selectOption("#frontier-x", "steps");
      await page.fill("#remove-steps", "2");
      await page.fill("#calibration-tokens", "32");
      await page.click("#measure");
      await until(async () => /running: .*\d+\/\d+/.test(await page.textContent("#analysis-status") ?? ""));
      await page.waitForSelector("#frontier svg[aria-label='frontier chart']", { timeout: 180_000 });
      const { report } = await (await fetch(`${server.base}/analysis`)).json();
      const f = report.frontier;
      assert.deepEqual(f.frontier.map((p: { steps: number }) => p.steps), [1, 2]);
      assert.equal(
        await page.locator("#frontier circle.plan").count(),
        2 * (f.plans.length + 1),
        "every measured plan and the unfused model, in the perplexity and the KL panels",
      );
      assert.equal(
        await page.locator("#frontier .active-mark").count(),
        2,
        "the active plan (unfused) ringed",
      );
      assert.ok(await page.isVisible("#heatmap svg"), "the dependency heatmap is drawn");
      assert.equal(
        await page.locator("#heatmap svg rect[fill^='rgb']").count(),
        (18 * 17) / 2,
        "one coloured cell per block pair j > i",
      );
      assert.equal(await page.locator("#heatmap svg .legend").count(), 1, "the heatmap has a colour scale");
      const pick = f.frontier[1];
      const dot = page.locator(`#frontier circle.plan[data-id="${pick.id}"]`).first();
      await dot.hover();
      assert.match(await page.textContent("#frontier-info") ?? "", new RegExp(`${pick.ppl.toFixed(3)}`));
      assert.ok((await page.textContent("#frontier-info"))!.startsWith(pick.id));

      const shot = await page.screenshot({ fullPage: true });
      const [w, h] = pngSize(shot);
      assert.equal(w, 1200);
      assert.ok(h >= 900, `page height ${h}`);
      assert.ok(shot.length > 30_000, `a screenshot of a real page, not a blank one (${shot.length} bytes)`);
      await Deno.writeFile(
        join(await artifacts(), "dashboard.png"),
        shot,
      );

      const chart = await page.locator("#frontier svg").screenshot();
      assert.deepEqual(pngSize(chart)[0], 760, "the frontier chart is on the screenshot, at its width");
      assert.ok(chart.length > 10_000, `a drawn chart, not an empty box (${chart.length} bytes)`);

      // Clicking a point applies its plan and moves the ring to it.
      await dot.click();
      await page.waitForSelector("#fuse-result.ok", { timeout: 20_000 });
      assert.equal((await (await fetch(`${server.base}/fuse`)).json()).active.id, pick.id);
      assert.equal(await page.textContent("#active-plan"), pick.id);
      await until(async () =>
        await page.locator("#frontier .active-mark").first().getAttribute("cx") ===
          await dot.getAttribute("cx")
      );

      // x = the measured decode speed-up: the background benchmark decodes each budget's best plan.
      await page.click("#measure-speed");
      await page.waitForSelector("#speed-status:text('measured')", { timeout: 180_000 });
      await page.selectOption("#frontier-x", "auto");
      await until(async () =>
        /decode speed-up over unfused/.test(await page.textContent("#frontier svg") ?? "")
      );
      const benched = (await (await fetch(`${server.base}/bench`)).json()).report;
      for (const p of f.frontier) {
        assert.ok(benched.decode.some((d: { plan: string }) => d.plan === p.id), `${p.id} decoded`);
        const title = await page.locator(`#frontier circle.plan[data-id="${p.id}"] title`).first()
          .textContent();
        assert.match(title ?? "", /decode \d+\.\d\dx/);
      }

      // The live panel: throughput and first-token latency from the server's own counters.
      for (let i = 0; i < 3; i++) {
        await (await post(server.base, "/v1/completions", { prompt: "def f(x):", max_tokens: 8 })).body
          ?.cancel();
      }
      await until(async () => /p50 \d+ ms, p99 \d+ ms/.test(await page.textContent("#live-ttft") ?? ""));
      await until(async () => /[1-9][\d.]* tokens\/s/.test(await page.textContent("#live-tps") ?? ""));

      // The form: a wrong token is refused and shown; the right one swaps the plan.
      await page.fill("#plan", JSON.stringify({ ffn_groups: [[3, 4, 5]] }));
      await page.fill("#token", "wrong-token");
      await page.click("#apply");
      await page.waitForSelector("#fuse-result.err");
      assert.match(await page.textContent("#fuse-result") ?? "", /bearer token/);
      await page.fill("#token", ADMIN);
      await page.click("#apply");
      await page.waitForSelector("#fuse-result.ok", { timeout: 20_000 });
      assert.equal(await page.textContent("#active-plan"), "ffn[3-5]");
      assert.equal((await (await fetch(`${server.base}/fuse`)).json()).active.id, "ffn[3-5]");
      const bad = await post(server.base, "/fuse", { ffn_groups: [[8, 9]] });
      assert.equal(bad.status, 401, "the API still requires the token outside the page");
      await bad.body?.cancel();

      // The benchmark from the page: cancelled while it runs, then run to its end with its progress,
      // the FFN chart and the decode chart (tokens/s per plan at each batch size) drawn without a reload.
      await page.fill("#bench-batch", "1, 2");
      await page.fill("#bench-rounds", "3");
      await page.fill("#bench-tokens", "4");
      await page.click("#bench-run");
      await page.click("#bench-cancel");
      await page.waitForSelector("#bench-status:text('cancelled')");
      await until(async () => (await (await fetch(`${server.base}/bench`)).json()).status === "cancelled");
      await page.click("#bench-run");
      await until(async () =>
        /running: .*\d+\/\d+ \(\d+%\)/.test(await page.textContent("#bench-status") ?? "")
      );
      assert.ok(await page.isVisible("#bench-progress"), "a progress bar while it runs");
      await page.waitForSelector("#bench-status:text('done')", { timeout: 180_000 });
      assert.ok(!(await page.isVisible("#bench-progress")), "no progress bar once done");
      const decoded = (await (await fetch(`${server.base}/bench`)).json()).report;
      assert.deepEqual([...new Set(decoded.batched.map((c: { batch: number }) => c.batch))], [1, 2]);
      const bars = page.locator("#bench-decode svg[aria-label='decode chart'] rect.decode");
      assert.equal(await bars.count(), decoded.batched.length, "one bar per plan and batch size");
      for (const c of decoded.batched) {
        const title = await page.locator(
          `#bench-decode rect.decode[data-plan="${c.plan}"][data-group="batch ${c.batch}"] title`,
        ).textContent();
        assert.ok(title?.includes(`${c.tokens_per_second.median.toFixed(1)} tokens/s`), title ?? "");
      }
      assert.ok(await page.isVisible("#bench svg[aria-label='benchmark chart']"));
      const benchShot = await page.locator("#bench-decode svg").screenshot();
      assert.ok(benchShot.length > 3_000, `a drawn decode chart (${benchShot.length} bytes)`);
      await Deno.writeFile(
        join(await artifacts(), "dashboard-bench.png"),
        await page.screenshot({ fullPage: true }),
      );

      // The playground: one prompt streamed through the active plan and the unfused model at once; each
      // pane's text is what a greedy completion of that plan gives, with its rate.
      await page.fill("#play-prompt", "def main(");
      await page.fill("#play-tokens", "12");
      await page.click("#play-run");
      await page.waitForSelector("#play-status:text('done')", { timeout: 120_000 });
      const greedyOf = async (plan: string) =>
        (await (await post(server.base, "/v1/completions", {
          prompt: "def main(",
          max_tokens: 12,
          temperature: 0,
          plan,
        })).json()).choices[0].text;
      assert.equal(await page.textContent("#play-active-plan"), "ffn[3-5]");
      assert.equal(await page.textContent("#play-unfused-plan"), "unfused");
      assert.equal(await page.textContent("#play-active-text"), await greedyOf("active"));
      assert.equal(await page.textContent("#play-unfused-text"), await greedyOf("unfused"));
      for (const side of ["active", "unfused"]) {
        assert.match(await page.textContent(`#play-${side}-speed`) ?? "", /^\d+ tokens, \d+\.\d tokens\/s$/);
      }
      assert.match(
        await page.textContent("#play-diff") ?? "",
        /the two texts are the same|agree for their first \d+/,
      );
      await Deno.writeFile(
        join(await artifacts(), "dashboard-playground.png"),
        await page.screenshot({ fullPage: true }),
      );
    } finally {
      await browser.close();
      await server.stop();
    }
  },
});

Deno.test("CI has Chromium, so the dashboard test above really ran", () => {
  if (Deno.env.get("CI")) assert.ok(CHROMIUM, "no Chromium in CI: scripts/test installs Debian's chromium");
});
