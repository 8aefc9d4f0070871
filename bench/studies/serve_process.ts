/**
 * A `serve` process as the CPU studies measure it (cpu_paths.ts, start_time.ts): started and waited on
 * until its `ready` line, and its CPU time and memory read from /proc (Linux); not a study itself.
 */

export interface ReadyServer {
  child: Deno.ChildProcess;
  port: number;
  /** From the spawn to the `ready` line. */
  readyMs: number;
}

/**
 * Runs `deno <args>` (a `serve` command) and waits for its `ready` line, then keeps draining its stdout
 * (one line per request) so that it never blocks on a full pipe. A server that exits first (a refusal)
 * returns its exit code and stderr instead.
 */
export async function startServe(
  args: string[],
  env?: Record<string, string>,
): Promise<ReadyServer | { code: number; stderr: string }> {
  const t0 = performance.now();
  const child = new Deno.Command(Deno.execPath(), { args, env, stdout: "piped", stderr: "piped" }).spawn();
  const stderr = new Response(child.stderr).text();
  let port = 0;
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  while (true) {
    const { value, done } = await lines.read();
    if (done) return { code: (await child.status).code, stderr: (await stderr).trim() };
    buffered += value;
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      if (!line.startsWith("{")) continue;
      const event = JSON.parse(line);
      if (event.event === "listening") port = event.port;
      if (event.event === "ready") {
        const readyMs = performance.now() - t0;
        (async () => {
          while (!(await lines.read()).done);
        })();
        return { child, port, readyMs };
      }
    }
  }
}

/** User and system CPU seconds of a process so far (clock ticks of 1/100 s). */
export async function cpuSeconds(pid: number): Promise<number> {
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** A /proc/PID/status field in bytes (VmHWM: peak resident; VmRSS: resident now). */
export async function statusBytes(pid: number, field: string): Promise<number> {
  const m = (await Deno.readTextFile(`/proc/${pid}/status`)).match(new RegExp(`${field}:\\s+(\\d+) kB`));
  return m ? Number(m[1]) * 1024 : NaN;
}
