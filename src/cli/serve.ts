import { z } from "zod";
import { readPlanFile, UNFUSED } from "../fusion/plan.ts";
import { ModelHost } from "../runtime/host.ts";
import { resolveDevice } from "../runtime/ort.ts";
import { LIMITS } from "../runtime/params.ts";
import { Scheduler } from "../runtime/scheduler.ts";
import { AnalysisRunner } from "../server/analysis.ts";
import { createApp } from "../server/app.ts";
import { BenchRunner } from "../server/bench.ts";
import { Metrics } from "../server/metrics.ts";
import { int, num, parseFlags, validateFlags } from "./args.ts";
import { DEFAULT_CALIBRATION_TEXT } from "./defaults.ts";
import { modelFlags } from "./load.ts";

const schema = z.strictObject({
  ...modelFlags,
  port: int().min(0).max(65535).default(8000),
  host: z.string().default("127.0.0.1"),
  text: z.string().default(DEFAULT_CALIBRATION_TEXT),
  "max-active": int().min(1).max(1024).default(8),
  "max-queue": int().min(0).max(100000).default(64),
  "request-timeout": num().gt(0).max(86400).default(300),
  "max-tokens-cap": int().min(1).max(LIMITS.maxTokens).default(LIMITS.maxTokens),
  "max-body-bytes": int().min(1024).max(64 << 20).default(1 << 20),
  "admin-token": z.string().min(8, "must be at least 8 characters").optional(),
  "api-key": z.string().min(8, "must be at least 8 characters").optional(),
});

const emit = (event: Record<string, unknown>) => console.log(JSON.stringify(event));

/**
 * `serve`: listens at once (so /health can say 503 while loading), then loads the model. stdout
 * carries JSON lines: `listening` (with the bound port, for scripts and tests), `ready`, one line
 * per request, `draining` and `stopped`. SIGTERM/SIGINT stop accepting, let streams finish, exit 0.
 */
export async function serveCommand(argv: string[]): Promise<void> {
  const raw = parseFlags(argv);
  raw["admin-token"] ??= Deno.env.get("FUSEDGE_ADMIN_TOKEN");
  raw["api-key"] ??= Deno.env.get("FUSEDGE_API_KEY");
  const flags = validateFlags(schema, raw);
  const device = await resolveDevice(flags.device);
  const plan = flags.plan ? await readPlanFile(flags.plan) : UNFUSED;
  const host = new ModelHost();
  const metrics = new Metrics();
  const scheduler = new Scheduler(flags["max-active"], flags["max-queue"]);
  const ready = () => (host.state === "ready" ? flags.model : null);
  const analysis = new AnalysisRunner(ready, flags.text);
  const bench = new BenchRunner(ready, () => host.device);
  const app = createApp({ host, scheduler, metrics, analysis, bench }, {
    maxBodyBytes: flags["max-body-bytes"],
    maxTokensCap: flags["max-tokens-cap"],
    requestTimeoutMs: flags["request-timeout"] * 1000,
    adminToken: flags["admin-token"],
    apiKey: flags["api-key"],
    log: console.log,
  });
  const server = Deno.serve({ hostname: flags.host, port: flags.port, onListen: () => {} }, app.fetch);
  const addr = server.addr as Deno.NetAddr;
  emit({ event: "listening", host: addr.hostname, port: addr.port });
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    host.draining = true;
    emit({ event: "draining", active: scheduler.active, queued: scheduler.queued });
    analysis.stop();
    await server.shutdown();
    await host.close();
    emit({ event: "stopped" });
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  await host.load(flags.model, plan, device);
  const inst = host.instance!;
  metrics.loadSeconds.set({}, host.loadMs / 1000);
  metrics.activePlan.set({ plan: inst.planId }, 1);
  emit({
    event: "ready",
    model: host.assets!.name,
    device,
    plan: inst.planId,
    load_ms: Math.round(host.loadMs),
  });
  await server.finished;
}
