import assert from "node:assert/strict";
import { PEER_HEADER, type Served, serveFronted } from "../src/server/front.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** A front over a handler that echoes what it was given; `slow` streams until its client goes. */
async function echoFront(headerTimeoutMs = 400, maxConnections = 8) {
  const aborted: string[] = [];
  const served = await serveFronted(
    { hostname: "127.0.0.1", port: 0, headerTimeoutMs, maxConnections },
    async (req, info) => {
      const url = new URL(req.url);
      if (url.pathname === "/slow") {
        req.signal.addEventListener("abort", () => aborted.push(url.pathname));
        let timer: ReturnType<typeof setInterval>;
        return new Response(
          new ReadableStream({
            start: (c) => void (timer = setInterval(() => c.enqueue(enc.encode("tick\n")), 20)),
            cancel: () => clearInterval(timer),
          }),
        );
      }
      const body = await req.text();
      return Response.json({
        method: req.method,
        path: url.pathname,
        body,
        peer: info.remoteAddr.hostname,
        forwarded: req.headers.get(PEER_HEADER) !== null,
      });
    },
  );
  return { served, aborted };
}

/** Reads whole HTTP/1.1 responses (Content-Length framed) off a connection, `n` of them. */
async function responses(
  conn: Deno.Conn,
  n: number,
): Promise<{ status: number; head: string; body: string }[]> {
  const out = [];
  let buf = new Uint8Array(0);
  const more = async () => {
    const chunk = new Uint8Array(65536);
    const got = await conn.read(chunk);
    if (got === null) throw new Error(`connection closed after ${out.length} responses`);
    const next = new Uint8Array(buf.length + got);
    next.set(buf);
    next.set(chunk.subarray(0, got), buf.length);
    buf = next;
  };
  // Byte offsets: a head is ASCII, so its text's index is its bytes'.
  const headEnd = () =>
    String.fromCharCode(...buf.subarray(0, Math.min(buf.length, 8192))).indexOf("\r\n\r\n");
  while (out.length < n) {
    let end = headEnd();
    while (end < 0) {
      await more();
      end = headEnd();
    }
    const head = dec.decode(buf.subarray(0, end));
    const length = Number(head.match(/content-length: (\d+)/i)?.[1] ?? 0);
    while (buf.length < end + 4 + length) await more();
    out.push({
      status: Number(head.split(" ")[1]),
      head,
      body: dec.decode(buf.subarray(end + 4, end + 4 + length)),
    });
    buf = buf.subarray(end + 4 + length);
  }
  return out;
}

/** Resolves with the bytes read until the server closes the connection. */
async function untilClosed(conn: Deno.Conn): Promise<string> {
  let text = "";
  const chunk = new Uint8Array(65536);
  for (;;) {
    const n = await conn.read(chunk).catch(() => null);
    if (n === null) return text;
    text += dec.decode(chunk.subarray(0, n));
  }
}

async function withFront(
  fn: (f: { served: Served; aborted: string[] }) => Promise<void>,
  timeout?: number,
  max?: number,
) {
  const f = await echoFront(timeout, max);
  try {
    await fn(f);
  } finally {
    await f.served.shutdown();
  }
}

Deno.test("front: requests kept alive and pipelined reach the server whole, with the client's address; a forged one is dropped", async () => {
  await withFront(async ({ served }) => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: served.addr.port });
    const body = JSON.stringify({ a: "é".repeat(3000) });
    // Three requests in one write: a GET, a body by Content-Length, a chunked body with a trailer.
    await conn.write(enc.encode(
      `GET /one HTTP/1.1\r\nHost: x\r\n${PEER_HEADER}: 10.0.0.1 1\r\n\r\n` +
        `POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: ${enc.encode(body).length}\r\n\r\n${body}` +
        `POST /three HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n` +
        `3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n`,
    ));
    const got = (await responses(conn, 3)).map((r) => JSON.parse(r.body));
    assert.deepEqual(got.map((g) => [g.method, g.path, g.peer, g.forwarded]), [
      ["GET", "/one", "127.0.0.1", true],
      ["POST", "/two", "127.0.0.1", true],
      ["POST", "/three", "127.0.0.1", true],
    ]);
    assert.equal(got[1].body, body, "a multi-byte body by its length");
    assert.equal(got[2].body, "abc0123456789", "a chunked body");
    // Kept alive: idle longer than the header timeout, then another request on the same connection.
    await new Promise((r) => setTimeout(r, 700));
    await conn.write(enc.encode("GET /four HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert.equal(JSON.parse((await responses(conn, 1))[0].body).path, "/four");
    conn.close();
  });
});

Deno.test("front: headers that do not arrive within the timeout get 408 on a first request; a later one is closed", async () => {
  await withFront(async ({ served }) => {
    const t0 = performance.now();
    const drip = await Deno.connect({ hostname: "127.0.0.1", port: served.addr.port });
    const reply = untilClosed(drip);
    for (const piece of ["GET /x HTTP/1.1\r\n", "Host: x\r\n", "X-A: 1\r\n", "X-B: 1\r\n", "X-C: 1\r\n"]) {
      await drip.write(enc.encode(piece)).catch(() => 0);
      await new Promise((r) => setTimeout(r, 150));
    }
    const text = await reply;
    const elapsed = performance.now() - t0;
    assert.match(text, /^HTTP\/1\.1 408 /);
    assert.match(text, /"message":"request headers took longer than 0\.4 s"/);
    assert.ok(elapsed >= 390 && elapsed < 3000, `closed after ${elapsed.toFixed(0)} ms`);
    drip.close();

    const silent = await Deno.connect({ hostname: "127.0.0.1", port: served.addr.port });
    assert.match(await untilClosed(silent), /^HTTP\/1\.1 408 /, "a connection that sends nothing");
    silent.close();

    // A second request that drips after a first that was answered: closed without an answer.
    const later = await Deno.connect({ hostname: "127.0.0.1", port: served.addr.port });
    await later.write(enc.encode("GET /a HTTP/1.1\r\nHost: x\r\n\r\n"));
    await responses(later, 1);
    await later.write(enc.encode("GET /b HTTP/1.1\r\n"));
    assert.equal(await untilClosed(later), "");
    later.close();
  });
});

Deno.test("front: one address holds at most maxConnections at once (429, closed); a freed one is taken again", async () => {
  await withFront(
    async ({ served }) => {
      const port = served.addr.port;
      const held = [
        await Deno.connect({ hostname: "127.0.0.1", port }),
        await Deno.connect({ hostname: "127.0.0.1", port }),
      ];
      // The front counts a connection once it has accepted it.
      await new Promise((r) => setTimeout(r, 50));
      const third = await Deno.connect({ hostname: "127.0.0.1", port });
      const text = await untilClosed(third);
      assert.match(text, /^HTTP\/1\.1 429 /);
      assert.match(text, /retry-after: 1/);
      assert.match(text, /"type":"rate_limit_error"/);
      assert.match(text, /2 connections from 127\.0\.0\.1 are open; at most 2 at once/);
      third.close();
      held[0].close();
      await new Promise((r) => setTimeout(r, 50));
      const again = await Deno.connect({ hostname: "127.0.0.1", port });
      await again.write(enc.encode("GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"));
      assert.equal((await responses(again, 1))[0].status, 200);
      again.close();
      held[1].close();
    },
    5000,
    2,
  );
});

Deno.test("front: heads whose framing a server could read otherwise are refused (400, 431), never relayed", async () => {
  await withFront(async ({ served }) => {
    const cases: [string, RegExp][] = [
      [
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        /^HTTP\/1\.1 400 /,
      ],
      ["POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", /^HTTP\/1\.1 400 /],
      ["POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", /^HTTP\/1\.1 400 /],
      ["GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", /^HTTP\/1\.1 400 /],
      [`GET / HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(70000)}\r\n\r\n`, /^HTTP\/1\.1 431 /],
    ];
    for (const [head, want] of cases) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: served.addr.port });
      await conn.write(enc.encode(head)).catch(() => 0);
      assert.match(await untilClosed(conn), want, JSON.stringify(head.slice(0, 80)));
      conn.close();
    }
  });
});

Deno.test("front: a client that leaves mid-response ends the request on the server, as Deno's own server does", async () => {
  await withFront(async ({ served, aborted }) => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: served.addr.port });
    await conn.write(enc.encode("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"));
    const chunk = new Uint8Array(4096);
    assert.ok((await conn.read(chunk))! > 0, "the stream started");
    conn.close();
    for (let i = 0; i < 100 && !aborted.length; i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(aborted, ["/slow"]);
  });
});
