import type { Context } from "hono";
import { join } from "node:path";
import tar from "tar-stream";
import { z } from "zod";
import { bodyError, CancelledError } from "../errors.ts";
import type { ExportJob } from "../export/write.ts";
import type { ExportSummary } from "../export/write.ts";
import { BackgroundJob } from "../workers/background.ts";
import type { ModelHost } from "../serving/host.ts";
import type { AppEnv } from "./logging.ts";

export type ExportRunner = BackgroundJob<ExportJob, ExportSummary>;

export const exportRunner = (): ExportRunner =>
  new BackgroundJob("an export", new URL("../workers/export_worker.ts", import.meta.url));

const exportQuery = z.object({
  dtype: z.enum(["fp32", "fp16", "bf16"]).default("bf16").describe("weight type of the safetensors"),
});

/** The directory's files as one tar stream, each file read in chunks as the client takes them. */
function tarOf(
  dir: string,
  files: string[],
  name: string,
  done: () => Promise<void>,
): ReadableStream<Uint8Array> {
  const pack = tar.pack();
  (async () => {
    try {
      for (const f of files) {
        const path = join(dir, f);
        const size = (await Deno.stat(path)).size;
        const entry = pack.entry({ name: `${name}/${f}`, size, mtime: new Date() });
        const file = await Deno.open(path);
        for await (const chunk of file.readable) {
          if (!entry.write(chunk)) await new Promise<void>((r) => entry.once("drain", () => r()));
        }
        await new Promise<void>((resolve, reject) => entry.end((e?: Error) => (e ? reject(e) : resolve())));
      }
      pack.finalize();
    } catch (e) {
      pack.destroy(e as Error);
    }
  })();
  // The written checkpoint is removed once the tar is sent, or once the client has gone.
  const chunks = (pack as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const next = await chunks.next();
      if (!next.done) return controller.enqueue(next.value);
      controller.close();
      await done();
    },
    async cancel() {
      pack.destroy();
      await done();
    },
  });
}

/**
 * GET /export: the active plan's checkpoint in the DeciLM / Nemotron-NAS layout (export/write.ts),
 * written by a worker into a temporary directory and streamed as a tar, then removed. One at a time
 * (409 while one runs); a client that leaves cancels it.
 */
export function exportRoute(job: ExportRunner, host: ModelHost) {
  return async (c: Context<AppEnv>) => {
    const parsed = exportQuery.safeParse(c.req.query());
    if (!parsed.success) throw bodyError(parsed.error);
    host.requireReady();
    const inst = host.instance!;
    const out = await Deno.makeTempDir({ prefix: "fusedge-export-" });
    const remove = () => Deno.remove(out, { recursive: true }).catch(() => {});
    try {
      job.start({
        checkpoint: host.checkpoint!,
        modelDir: host.modelDir,
        plan: inst.plan,
        dtype: parsed.data.dtype,
        out,
        calibrationText: host.calibrationText,
      });
    } catch (e) {
      await remove();
      throw e;
    }
    const gone = () => job.running && job.cancel();
    c.req.raw.signal.addEventListener("abort", gone, { once: true });
    const status = await job.wait();
    c.req.raw.signal.removeEventListener("abort", gone);
    if (status !== "done") {
      await remove();
      throw job.failure ?? new CancelledError("the export was cancelled");
    }
    const files: string[] = [];
    for await (const e of Deno.readDir(out)) if (e.isFile) files.push(e.name);
    files.sort();
    const name = `${host.name}-${inst.planId.replace(/[^A-Za-z0-9._-]+/g, "_")}`;
    c.header("content-type", "application/x-tar");
    c.header("content-disposition", `attachment; filename="${name}.tar"`);
    return c.body(tarOf(out, files, name, remove));
  };
}
