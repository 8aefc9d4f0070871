import { join } from "node:path";
import { errorBody } from "./errors.ts";

/**
 * The header each request relayed by the front carries its client's address in ("<hostname> <port>").
 * The front drops any a client sends, and only the front reaches the server behind it.
 */
export const PEER_HEADER = "x-fusedge-peer";

/** Largest request header block relayed: beyond it, 431. */
const MAX_HEAD_BYTES = 64 << 10;
/** Largest chunk-size line of a chunked body (extensions included). */
const MAX_LINE_BYTES = 4096;
const READ_BYTES = 64 << 10;

export interface FrontOptions {
  hostname: string;
  port: number;
  /**
   * Milliseconds a request's header block may take to arrive: a connection's first from the moment it
   * is accepted, a later one's from its first byte.
   */
  headerTimeoutMs: number;
  /** Connections one client address may hold open at once; beyond, 429 and closed. */
  maxConnections: number;
}

export interface Served {
  addr: Deno.NetAddr;
  /** Stops taking connections, then waits for the server's responses to end (Deno.HttpServer.shutdown). */
  shutdown(): Promise<void>;
}

/** A request the front answers itself: its head broke a limit or HTTP/1.1's framing rules. */
class Refusal extends Error {
  constructor(readonly status: number, readonly reason: string, message: string) {
    super(message);
  }
}

/**
 * Serves `handler` behind a front of our own: Deno's HTTP server has no deadline for a request's headers
 * (denoland/deno#3515) and nothing to hook where a connection is accepted, so a client that sends its
 * header lines a byte at a time holds a connection for as long as it likes, and one address may open any
 * number of them. The front accepts each TCP connection itself: an address over `maxConnections` gets
 * 429 and is closed; each request's header block must arrive within `headerTimeoutMs` (408 for a
 * connection's first request, which nothing has answered yet; a later one is closed); and the requests
 * are relayed byte for byte to Deno.serve on a private Unix socket (loopback TCP where there are none),
 * the client's address in PEER_HEADER, which `handler` gets back as its `remoteAddr`. Bodies are relayed
 * by their own framing (Content-Length, or chunked) to find where the next request starts; a head whose
 * framing is ambiguous (both, a repeated or malformed length, another transfer coding, folded lines) is
 * refused, so that the front and the server never read one stream as different requests.
 */
export async function serveFronted(
  opts: FrontOptions,
  handler: Deno.ServeHandler<Deno.NetAddr>,
): Promise<Served> {
  const listener = Deno.listen({ hostname: opts.hostname, port: opts.port });
  const unix = Deno.build.os !== "windows";
  const dir = unix ? await Deno.makeTempDir({ prefix: "fusedge-front-" }) : null;
  const path = dir ? join(dir, "http.sock") : null;
  const inner = (req: Request, info: Deno.ServeHandlerInfo) =>
    handler(req, { remoteAddr: peerOf(req) ?? (info.remoteAddr as Deno.NetAddr), completed: info.completed });
  const behind: Deno.HttpServer = path
    ? Deno.serve({ path, onListen: () => {} }, inner)
    : Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, inner);
  const connect = path
    ? () => Deno.connect({ transport: "unix", path })
    : () => Deno.connect({ hostname: "127.0.0.1", port: (behind.addr as Deno.NetAddr).port });
  const open = new Map<string, number>();
  let closing = false;
  const accepting = (async () => {
    while (!closing) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch {
        // Out of file descriptors, a connection reset before it was taken: the next one may do.
        if (!closing) await new Promise((r) => setTimeout(r, 10));
        continue;
      }
      // Tokens are small writes that must go at once (Deno's own server sets this too).
      conn.setNoDelay(true);
      const address = conn.remoteAddr.hostname;
      const n = open.get(address) ?? 0;
      if (n >= opts.maxConnections) {
        void refuse(
          conn,
          new Refusal(
            429,
            "Too Many Requests",
            `${n} connections from ${address} are open; at most ${opts.maxConnections} at once`,
          ),
        );
        continue;
      }
      open.set(address, n + 1);
      void relay(conn, connect, opts.headerTimeoutMs).finally(() => {
        const left = (open.get(address) ?? 1) - 1;
        if (left > 0) open.set(address, left);
        else open.delete(address);
      });
    }
  })();
  return {
    addr: listener.addr as Deno.NetAddr,
    async shutdown() {
      closing = true;
      listener.close();
      await accepting;
      await behind.shutdown();
      if (dir) await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** The client address the front passed on, if the request came through it. */
function peerOf(req: Request): Deno.NetAddr | null {
  const [hostname, port] = (req.headers.get(PEER_HEADER) ?? "").split(" ");
  return hostname ? { transport: "tcp", hostname, port: Number(port) } : null;
}

/** Answers a refused request (OpenAI's error body) and closes the connection. */
async function refuse(conn: Deno.Conn, r: Refusal): Promise<void> {
  const body = JSON.stringify(
    errorBody(r.message, r.status === 429 ? "rate_limit_error" : "invalid_request_error"),
  );
  const head = [
    `HTTP/1.1 ${r.status} ${r.reason}`,
    "content-type: application/json",
    `content-length: ${new TextEncoder().encode(body).length}`,
    "connection: close",
    ...(r.status === 429 ? ["retry-after: 1"] : []),
  ];
  try {
    await writeAll(conn, new TextEncoder().encode(`${head.join("\r\n")}\r\n\r\n${body}`));
  } catch {
    // The client is gone already.
  }
  close(conn);
}

function close(conn: Deno.Conn | null): void {
  try {
    conn?.close();
  } catch {
    // Closed already.
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) at += await conn.write(bytes.subarray(at));
}

/**
 * One client connection: its requests' heads read within the deadline and relayed with the client's
 * address, their bodies by their framing; the responses flow back as they come. Either side closing
 * closes both, as Deno's server does when a client goes (so a request whose client left is cancelled).
 */
async function relay(
  conn: Deno.TcpConn,
  connect: () => Promise<Deno.Conn>,
  timeoutMs: number,
): Promise<void> {
  const input = new Input(conn, timeoutMs);
  const peer = `${conn.remoteAddr.hostname} ${conn.remoteAddr.port}`;
  let up: Deno.Conn | null = null;
  try {
    for (let deadline: number | null = performance.now() + timeoutMs;; deadline = null) {
      const head = await input.head(deadline);
      if (!head) break;
      const framing = frame(head.lines);
      if (!up) {
        up = await connect();
        // Responses back to the client as they come; when the server ends the connection, so does the client's.
        const server = up;
        void server.readable.pipeTo(conn.writable).catch(() => {}).finally(() => {
          close(conn);
          close(server);
        });
      }
      await writeAll(up, head.bytes(peer));
      await relayBody(input, up, framing);
    }
  } catch (e) {
    // Nothing has gone to the server yet: the refusal is this connection's only answer.
    if (e instanceof Refusal && !up) return await refuse(conn, e);
  } finally {
    close(up);
    close(conn);
  }
}

/** How a request's body is framed: `length` bytes, or chunked. */
type Framing = { chunked: true } | { chunked: false; length: number };

/** The body's framing from the head's lines (request line first), refusing any a server could read otherwise. */
function frame(lines: string[]): Framing {
  if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP\/1\.[01]$/.test(lines[0])) {
    throw new Refusal(400, "Bad Request", "malformed request line");
  }
  const lengths: string[] = [];
  const codings: string[] = [];
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon <= 0 || /^[ \t]/.test(line)) throw new Refusal(400, "Bad Request", "malformed header line");
    const name = line.slice(0, colon).toLowerCase();
    const value = line.slice(colon + 1).trim();
    if (name === "content-length") lengths.push(value);
    else if (name === "transfer-encoding") codings.push(value.toLowerCase());
  }
  if (codings.length) {
    if (lengths.length || codings.length > 1 || codings[0] !== "chunked") {
      throw new Refusal(
        400,
        "Bad Request",
        "transfer-encoding must be chunked alone, without content-length",
      );
    }
    return { chunked: true };
  }
  if (lengths.some((l) => l !== lengths[0]) || (lengths.length && !/^\d{1,15}$/.test(lengths[0]))) {
    throw new Refusal(400, "Bad Request", "content-length must be one number");
  }
  return { chunked: false, length: lengths.length ? Number(lengths[0]) : 0 };
}

async function relayBody(input: Input, up: Deno.Conn, framing: Framing): Promise<void> {
  if (!framing.chunked) return await input.relay(up, framing.length);
  for (;;) {
    const line = await input.line();
    const digits = line.text.split(";")[0].trim();
    const size = parseInt(digits, 16);
    if (!/^[0-9a-fA-F]{1,12}$/.test(digits)) throw new Refusal(400, "Bad Request", "malformed chunk size");
    await writeAll(up, line.bytes);
    if (size > 0) {
      await input.relay(up, size + 2);
      continue;
    }
    // The last chunk: trailer lines up to an empty one.
    for (let t = await input.line();; t = await input.line()) {
      await writeAll(up, t.bytes);
      if (t.text === "") return;
    }
  }
}

/** Bytes as text one character a byte, and back: a head's bytes pass through unchanged. */
function latin1(b: Uint8Array): string {
  let text = "";
  for (let i = 0; i < b.length; i += 8192) text += String.fromCharCode(...b.subarray(i, i + 8192));
  return text;
}

function bytesOf(text: string): Uint8Array {
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

/** The client side of a connection, buffered: heads, lines and counted bytes. */
class Input {
  private buf = new Uint8Array(READ_BYTES);
  private start = 0;
  private end = 0;

  /** `timeoutMs`: how long a head may take (see head). */
  constructor(private readonly conn: Deno.Conn, private readonly timeoutMs: number) {}

  /**
   * The next request's head, or null where the client closed between requests. It must be whole by
   * `deadline`, or within `timeoutMs` of its first byte where none is set.
   */
  async head(deadline: number | null) {
    // Bytes of this head already searched, counted from `start` (a read may move the buffer).
    for (let searched = 0;;) {
      const at = this.find(this.start + searched);
      if (at - this.start > MAX_HEAD_BYTES || (at < 0 && this.end - this.start > MAX_HEAD_BYTES)) {
        throw new Refusal(
          431,
          "Request Header Fields Too Large",
          `request headers over ${MAX_HEAD_BYTES} bytes`,
        );
      }
      if (at >= 0) {
        const text = latin1(this.buf.subarray(this.start, at));
        this.start = at + 4;
        const lines = text.split("\r\n");
        return {
          lines,
          /** The head as relayed: the client's address in PEER_HEADER, any the client sent dropped. */
          bytes: (peer: string) =>
            bytesOf(
              [
                lines[0],
                `${PEER_HEADER}: ${peer}`,
                ...lines.slice(1).filter((l) => !l.toLowerCase().startsWith(`${PEER_HEADER}:`)),
              ].join("\r\n") + "\r\n\r\n",
            ),
        };
      }
      searched = Math.max(0, this.end - this.start - 3);
      if (deadline === null && this.end > this.start) deadline = performance.now() + this.timeoutMs;
      if (!await this.fill(deadline)) {
        if (this.end > this.start) throw new Error("the client closed inside a request's headers");
        return null;
      }
    }
  }

  /** The next CRLF-ended line (of a chunked body), its bytes with the CRLF. */
  async line(): Promise<{ text: string; bytes: Uint8Array }> {
    for (;;) {
      for (let i = this.start; i + 1 < this.end; i++) {
        if (this.buf[i] === 13 && this.buf[i + 1] === 10) {
          const bytes = this.buf.slice(this.start, i + 2);
          this.start = i + 2;
          return { text: latin1(bytes.subarray(0, bytes.length - 2)), bytes };
        }
      }
      if (this.end - this.start > MAX_LINE_BYTES) {
        throw new Refusal(400, "Bad Request", "chunk line too long");
      }
      if (!await this.fill(null)) throw new Error("the client closed inside a chunked body");
    }
  }

  /** Relays the next `n` bytes to `to` as they arrive. */
  async relay(to: Deno.Conn, n: number): Promise<void> {
    while (n > 0) {
      if (this.end === this.start && !await this.fill(null)) {
        throw new Error("the client closed inside a body");
      }
      const take = Math.min(n, this.end - this.start);
      await writeAll(to, this.buf.subarray(this.start, this.start + take));
      this.start += take;
      n -= take;
    }
  }

  /** Where the next CRLFCRLF starts, looking from `from`; -1 if none is buffered. */
  private find(from: number): number {
    for (let i = from; i + 3 < this.end; i++) {
      if (this.buf[i] === 13 && this.buf[i + 1] === 10 && this.buf[i + 2] === 13 && this.buf[i + 3] === 10) {
        return i;
      }
    }
    return -1;
  }

  /** Reads more; false at the client's end. Past `deadline` (ms, performance.now()) it throws 408. */
  private async fill(deadline: number | null): Promise<boolean> {
    const used = this.end - this.start;
    if (this.buf.length - this.end < READ_BYTES) {
      if (used + READ_BYTES <= this.buf.length) this.buf.copyWithin(0, this.start, this.end);
      else {
        const bigger = new Uint8Array(used + READ_BYTES);
        bigger.set(this.buf.subarray(this.start, this.end));
        this.buf = bigger;
      }
      this.start = 0;
      this.end = used;
    }
    const read = this.conn.read(this.buf.subarray(this.end));
    let n: number | null;
    if (deadline === null) n = await read;
    else {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<"late">((r) =>
        timer = setTimeout(() => r("late"), Math.max(0, deadline - performance.now()))
      );
      const won = await Promise.race([read, late]);
      clearTimeout(timer);
      if (won === "late") {
        read.catch(() => {});
        throw new Refusal(
          408,
          "Request Timeout",
          `request headers took longer than ${this.timeoutMs / 1000} s`,
        );
      }
      n = won;
    }
    if (n === null) return false;
    this.end += n;
    return true;
  }
}
