import { z } from "zod";
import { LIMITS } from "../requests/generation.ts";
import { InputError } from "../errors.ts";
import { ChatTemplate } from "../model/chat_template.ts";
import { parsePlan, readPlanFile, UNFUSED } from "../fusion/plan.ts";
import { ModelHost } from "../serving/host.ts";
import { adapterMaxBuffer, resolveDevice, resolveGraphOptions } from "../ort/ort.ts";
import { Scheduler } from "../serving/scheduler.ts";
import { DEFAULT_TEMPLATE_LIMITS } from "../serving/template_sandbox.ts";
import { waitAtMost } from "../yield.ts";
import { createApp } from "../server/app.ts";
import { allowedHosts } from "../server/guards.ts";
import { analysisRunner, benchRunner } from "../server/jobs.ts";
import { exportRunner } from "../server/export.ts";
import { Metrics } from "../server/metrics.ts";
import { DEFAULT_CALIBRATION_TEXT } from "./defaults.ts";
import { defineCommand } from "./flags.ts";
import { healedIf, modelFlags } from "./load.ts";
import { decodeAdvice } from "../ort/decode_estimate.ts";
import { serveFronted } from "../server/front.ts";

/** Hono's bearer-auth accepts RFC 6750 token characters only; another token could never match. */
const token = z.string().min(8, "must be at least 8 characters").regex(
  /^[A-Za-z0-9._~+/-]+=*$/,
  "may use letters, digits and . _ ~ + / - only",
);

/** The file's text, parsed once here so that a template with a syntax error stops the start (exit 2). */
async function readChatTemplateFile(path: string): Promise<string> {
  let source: string;
  try {
    source = await Deno.readTextFile(path);
  } catch (e) {
    throw new InputError(`cannot read ${path}: ${(e as Error).message}`, "chat_template");
  }
  ChatTemplate.compile({ source, origin: "--chat-template", specialTokens: {} });
  return source;
}

const emit = (event: Record<string, unknown>) => console.log(JSON.stringify(event));

/**
 * `serve`: listens at once (so /health can say 503 while loading), then loads the model. stdout
 * carries JSON lines: `listening` (with the bound port, for scripts and tests), `advice` (a model WASM
 * would decode slower than 10 tokens/s: what --device cpu would give), `ready`, one line per
 * request, `draining` and `stopped`. SIGTERM/SIGINT: /health turns 503 "draining" and new work is
 * refused with 503 while the streams in flight finish (up to --drain-timeout), then the process exits 0.
 */
export const serveCommand = defineCommand({
  name: "serve",
  summary:
    "the HTTP service (JSON lines on stdout: listening, advice, ready, one per request, draining, stopped)",
  schema: z.strictObject({
    ...modelFlags,
    port: z.number().int().min(0).max(65535).default(8000).describe("port (0 picks a free one)"),
    host: z.string().default("127.0.0.1").describe("address to bind"),
    allowed_host: z.array(z.string().min(1)).default([]).describe(
      "another Host name to answer (DNS rebinding guard)",
    ),
    cors: z.array(z.string().url()).default([]).describe("an origin allowed to call from a browser"),
    chat_template: z.string().optional().describe(
      "a Jinja chat template file for /v1/chat/completions (replaces the checkpoint's)",
    ),
    template_time_ms: z.number().int().min(10).max(600_000).default(DEFAULT_TEMPLATE_LIMITS.timeMs).describe(
      "wall time one chat-template render may take (then 400)",
    ),
    template_heap_mb: z.number().int().min(16).max(4096).default(DEFAULT_TEMPLATE_LIMITS.heapMb).describe(
      "heap one chat-template render may use (then 400)",
    ),
    special_tokens_in_content: z.boolean().default(false).describe(
      "read special-token text in chat messages as special tokens (default: as plain text)",
    ),
    text: z.string().default(DEFAULT_CALIBRATION_TEXT).describe("calibration text for POST /analysis"),
    max_active: z.number().int().min(1).max(1024).default(8).describe("generations decoding at once"),
    max_queue: z.number().int().min(0).max(100000).default(64).describe(
      "requests waiting for a slot (then 429)",
    ),
    kv_cache_mb: z.number().gt(0).max(2 ** 20).optional().describe(
      "KV-cache budget in MB for all sequences (default: min(1024, free memory / 4, what WASM's heap leaves), " +
        "at least one whole-context sequence)",
    ),
    prefix_cache_mb: z.number().min(0).max(2 ** 20).optional().describe(
      "of the KV budget, MB finished sequences kept for prefix reuse may hold on cpu and wasm " +
        "(default: an eighth of the served weights, at least 64; 0 keeps none)",
    ),
    request_timeout: z.number().gt(0).max(86400).default(300).describe("seconds one generation may take"),
    drain_timeout: z.number().min(0).max(86400).default(30).describe("seconds shutdown waits for streams"),
    max_tokens_cap: z.number().int().min(1).max(LIMITS.maxTokens).default(LIMITS.maxTokens)
      .describe("largest max_tokens accepted"),
    max_body_bytes: z.number().int().min(1024).max(64 << 20).default(1 << 20).describe(
      "largest request body",
    ),
    body_timeout: z.number().gt(0).max(3600).default(30).describe(
      "seconds a request body may take to arrive (then 408)",
    ),
    max_client_requests: z.number().int().min(1).max(100000).default(64).describe(
      "requests one client address may have in flight (then 429)",
    ),
    header_timeout: z.number().gt(0).max(3600).default(10).describe(
      "seconds a request's headers may take to arrive (then 408)",
    ),
    max_client_connections: z.number().int().min(1).max(100000).default(128).describe(
      "connections one client address may hold open (then 429)",
    ),
    admin_token: token.optional().describe("bearer token for POST/DELETE /fuse, /bench, /analysis"),
    api_key: token.optional().describe("bearer token for /v1/*"),
  }),
  env: { admin_token: "FUSEDGE_ADMIN_TOKEN", api_key: "FUSEDGE_API_KEY" },
  async run(flags) {
    const device = await resolveDevice(flags.device);
    const graph = await resolveGraphOptions(flags.dtype, flags.quantize, device);
    const plan = healedIf(flags.plan ? parsePlan(await readPlanFile(flags.plan)) : UNFUSED, flags.heal);
    const chatTemplate = flags.chat_template ? await readChatTemplateFile(flags.chat_template) : undefined;
    const host = new ModelHost();
    const metrics = new Metrics();
    const scheduler = new Scheduler(flags.max_active, flags.max_queue, {
      get budgetBytes() {
        return host.kvBudgetBytes;
      },
      bytesPerToken: () => host.instance?.kvBytesPerToken ?? 0,
      slotTokens: () => host.instance?.slots?.tokens ?? null,
    });
    const lifecycle = { draining: false };
    const analysis = analysisRunner();
    const bench = benchRunner();
    const exports = exportRunner();
    const app = createApp({ host, scheduler, metrics, analysis, bench, exports, lifecycle }, {
      maxBodyBytes: flags.max_body_bytes,
      bodyTimeoutMs: flags.body_timeout * 1000,
      maxClientRequests: flags.max_client_requests,
      maxTokensCap: flags.max_tokens_cap,
      requestTimeoutMs: flags.request_timeout * 1000,
      adminToken: flags.admin_token,
      apiKey: flags.api_key,
      allowedHosts: allowedHosts(flags.host, flags.allowed_host),
      corsOrigins: flags.cors,
      textPath: flags.text,
      log: console.log,
    });
    const server = await serveFronted({
      hostname: flags.host,
      port: flags.port,
      headerTimeoutMs: flags.header_timeout * 1000,
      maxConnections: flags.max_client_connections,
    }, app.fetch);
    const addr = server.addr;
    emit({ event: "listening", host: addr.hostname, port: addr.port });
    const { promise: stopped, resolve: exit } = Promise.withResolvers<void>();
    let stopping = false;
    const stop = async () => {
      if (stopping) return;
      stopping = true;
      lifecycle.draining = true;
      emit({ event: "draining", active: scheduler.active, queued: scheduler.queued });
      analysis.stop();
      bench.stop();
      exports.stop();
      await waitAtMost(scheduler.idle(), flags.drain_timeout * 1000);
      await server.shutdown();
      await host.close();
      emit({ event: "stopped", active: scheduler.active });
      exit();
    };
    Deno.addSignalListener("SIGINT", stop);
    Deno.addSignalListener("SIGTERM", stop);
    await host.load(flags.model, plan, device, {
      graph,
      maxContext: flags.max_context,
      kvCacheMb: flags.kv_cache_mb,
      prefixCacheMb: flags.prefix_cache_mb,
      maxBufferBytes: await adapterMaxBuffer(device),
      calibrationText: flags.calibration,
      chat: {
        chatTemplate,
        templateLimits: { timeMs: flags.template_time_ms, heapMb: flags.template_heap_mb },
        specialTokensInContent: flags.special_tokens_in_content,
      },
      threads: flags.threads,
      slots: flags.max_active,
    });
    const inst = host.instance!;
    const advice = decodeAdvice(host.config!, inst.graph, device);
    if (advice) emit({ event: "advice", message: advice });
    metrics.loadSeconds.set({}, host.loadMs / 1000);
    metrics.activePlan.set({ plan: inst.planId }, 1);
    emit({ event: "ready", model: host.name, device, plan: inst.planId, load_ms: Math.round(host.loadMs) });
    await stopped;
  },
});
