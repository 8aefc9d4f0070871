import { z } from "zod";
import { UNFUSED } from "../fusion/plan.ts";
import { ModelHost } from "../runtime/host.ts";
import { resolveDevice } from "../runtime/ort.ts";
import { createApp } from "../server/app.ts";
import { int, parseFlags, validateFlags } from "./args.ts";
import { modelFlags } from "./load.ts";
import { DEFAULT_CALIBRATION_TEXT } from "./defaults.ts";
import { AnalysisRunner } from "../server/analysis.ts";
import { BenchRunner } from "../server/bench.ts";
import { InputError } from "../errors.ts";

const schema = z.strictObject({
  ...modelFlags,
  port: int().min(0).max(65535).default(8000),
  host: z.string().default("127.0.0.1"),
  text: z.string().default(DEFAULT_CALIBRATION_TEXT),
});

async function readPlan(path: string | undefined): Promise<unknown> {
  if (!path) return UNFUSED;
  try {
    return JSON.parse(await Deno.readTextFile(path));
  } catch (e) {
    throw new InputError(`cannot read plan ${path}: ${(e as Error).message}`);
  }
}

/**
 * `serve`: listens at once (so /health can say 503 while loading), then loads the model. The first
 * line on stdout is JSON with the bound address, which tests and scripts read to find a free port.
 */
export async function serveCommand(argv: string[]): Promise<void> {
  const flags = validateFlags(schema, parseFlags(argv));
  const device = await resolveDevice(flags.device);
  const plan = await readPlan(flags.plan);
  const host = new ModelHost();
  const ready = () => (host.state === "ready" ? flags.model : null);
  const analysis = new AnalysisRunner(ready, flags.text);
  const bench = new BenchRunner(ready, () => host.device);
  const app = createApp({ host, analysis, bench }, { maxBodyBytes: 1 << 20 });
  const server = Deno.serve({ hostname: flags.host, port: flags.port, onListen: () => {} }, app.fetch);
  const addr = server.addr as Deno.NetAddr;
  console.log(JSON.stringify({ event: "listening", host: addr.hostname, port: addr.port }));
  await host.load(flags.model, plan, device);
  const inst = host.instance!;
  console.log(
    JSON.stringify({
      event: "ready",
      model: host.assets!.name,
      device,
      plan: inst.planId,
      load_ms: Math.round(host.loadMs),
    }),
  );
  const stop = async () => {
    analysis.stop();
    await server.shutdown();
    await host.close();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  await server.finished;
}
