import { LiveStats } from "./live_stats.ts";
/**
 * A small Prometheus registry: counters and gauges with labels, and histograms, rendered in the
 * text exposition format. Enough for /metrics without a dependency.
 */

type Labels = Record<string, string>;

const key = (labels: Labels) => JSON.stringify(Object.entries(labels).sort());

function renderLabels(labels: Labels, extra: Labels = {}): string {
  const all = { ...labels, ...extra };
  const parts = Object.entries(all).map(([k, v]) =>
    `${k}="${v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")}"`
  );
  return parts.length ? `{${parts.join(",")}}` : "";
}

interface Metric {
  render(): string[];
}

export class Counter implements Metric {
  private readonly values = new Map<string, { labels: Labels; value: number }>();
  constructor(readonly name: string, readonly help: string, readonly type: "counter" | "gauge" = "counter") {}

  inc(labels: Labels = {}, by = 1): void {
    const k = key(labels);
    const cur = this.values.get(k) ?? { labels, value: 0 };
    cur.value += by;
    this.values.set(k, cur);
  }

  set(labels: Labels, value: number): void {
    this.values.set(key(labels), { labels, value });
  }

  get(labels: Labels = {}): number {
    return this.values.get(key(labels))?.value ?? 0;
  }

  /** Drops every series (for info-style gauges whose label changes, such as the active plan). */
  reset(): void {
    this.values.clear();
  }

  render(): string[] {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} ${this.type}`];
    for (const { labels, value } of this.values.values()) {
      lines.push(`${this.name}${renderLabels(labels)} ${value}`);
    }
    return lines;
  }
}

export class Histogram implements Metric {
  private readonly counts: number[];
  private sum = 0;
  private count = 0;

  constructor(readonly name: string, readonly help: string, readonly buckets: number[]) {
    this.counts = new Array(buckets.length).fill(0);
  }

  observe(v: number): void {
    this.sum += v;
    this.count++;
    this.buckets.forEach((b, i) => {
      if (v <= b) this.counts[i]++;
    });
  }

  render(): string[] {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    this.buckets.forEach((b, i) => lines.push(`${this.name}_bucket{le="${b}"} ${this.counts[i]}`));
    lines.push(
      `${this.name}_bucket{le="+Inf"} ${this.count}`,
      `${this.name}_sum ${this.sum}`,
      `${this.name}_count ${this.count}`,
    );
    return lines;
  }
}

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

/** Every metric fusedge exports. */
export class Metrics {
  /** The dashboard's recent throughput and TTFT (not exported to Prometheus). */
  readonly live = new LiveStats();
  readonly requests = new Counter("fusedge_http_requests_total", "HTTP requests by route, method and status");
  readonly tokens = new Counter("fusedge_generated_tokens_total", "Tokens generated");
  readonly ttft = new Histogram(
    "fusedge_time_to_first_token_seconds",
    "Time from request to first streamed token",
    LATENCY_BUCKETS,
  );
  readonly interToken = new Histogram(
    "fusedge_inter_token_latency_seconds",
    "Time between consecutive tokens of a stream",
    LATENCY_BUCKETS,
  );
  readonly queueDepth = new Counter("fusedge_queue_depth", "Requests waiting for a generation slot", "gauge");
  readonly active = new Counter("fusedge_active_generations", "Generations currently decoding", "gauge");
  readonly rejected = new Counter("fusedge_rejected_total", "Requests refused because the queue was full");
  readonly cancelled = new Counter(
    "fusedge_cancelled_total",
    "Generations stopped because the client went away or timed out",
  );
  readonly activePlan = new Counter(
    "fusedge_active_plan",
    "The plan being served (label plan), value 1",
    "gauge",
  );
  readonly swaps = new Counter("fusedge_plan_swaps_total", "Completed plan swaps");
  readonly instances = new Counter(
    "fusedge_plan_instances",
    "Plan instances alive (active, retiring, being built), each a worker with its own session",
    "gauge",
  );
  readonly swapSeconds = new Histogram("fusedge_plan_swap_seconds", "Time to build and swap in a plan", [
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
  ]);
  readonly swapRebuiltBytes = new Counter(
    "fusedge_plan_swap_rebuilt_bytes_total",
    "Weight bytes plan swaps converted (fused, transposed, cast, quantized): the groups that changed",
  );
  readonly swapReusedBytes = new Counter(
    "fusedge_plan_swap_reused_bytes_total",
    "Weight bytes plan swaps took unchanged from earlier plans",
  );
  readonly weightCache = new Counter(
    "fusedge_weight_cache_bytes",
    "Converted weights kept for reuse by later plan swaps",
    "gauge",
  );
  readonly kvBudget = new Counter(
    "fusedge_kv_cache_budget_bytes",
    "KV-cache budget (--kv-cache-mb)",
    "gauge",
  );
  readonly kvReserved = new Counter(
    "fusedge_kv_cache_reserved_bytes",
    "KV cache the admitted sequences can grow to, batch padding included",
    "gauge",
  );
  readonly prefixHits = new Counter(
    "fusedge_prefix_cache_hits_total",
    "Completions whose prompt started from a cached KV prefix",
  );
  readonly prefixTokens = new Counter(
    "fusedge_prefix_cache_tokens_total",
    "Prompt tokens taken from cached KV prefixes instead of being prefilled",
  );
  readonly kvUsed = new Counter("fusedge_kv_cache_bytes", "KV cache held by the sequences now", "gauge");
  readonly loadSeconds = new Counter("fusedge_model_load_seconds", "Time the model took to load", "gauge");
  readonly rss = new Counter(
    "fusedge_process_resident_memory_bytes",
    "Resident memory of the server process",
    "gauge",
  );

  readonly cpu = new Counter(
    "fusedge_process_cpu_seconds_total",
    "CPU time of the server process, every worker thread included (Linux)",
  );

  constructor() {
    // Counters exist from the start, so a rate() over the first increment sees it.
    for (
      const c of [
        this.tokens,
        this.rejected,
        this.cancelled,
        this.swaps,
        this.swapRebuiltBytes,
        this.swapReusedBytes,
        this.prefixHits,
        this.prefixTokens,
      ]
    ) {
      c.inc({}, 0);
    }
  }

  render(): string {
    this.rss.set({}, Deno.memoryUsage().rss);
    const cpu = processCpuSeconds();
    if (cpu !== null) this.cpu.set({}, cpu);
    const all: Metric[] = [
      this.requests,
      this.tokens,
      this.ttft,
      this.interToken,
      this.queueDepth,
      this.active,
      this.rejected,
      this.cancelled,
      this.activePlan,
      this.swaps,
      this.instances,
      this.swapSeconds,
      this.swapRebuiltBytes,
      this.swapReusedBytes,
      this.weightCache,
      this.kvBudget,
      this.kvReserved,
      this.kvUsed,
      this.prefixHits,
      this.prefixTokens,
      this.loadSeconds,
      this.rss,
      this.cpu,
    ];
    return all.flatMap((m) => m.render()).join("\n") + "\n";
  }
}

/** User + system time of this process from /proc (clock ticks of 1/100 s), or null off Linux. */
function processCpuSeconds(): number | null {
  try {
    const stat = Deno.readTextFileSync("/proc/self/stat");
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return null;
  }
}
