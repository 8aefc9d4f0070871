/**
 * Reads a server-sent-events body frame by frame as it arrives: the `data:` payload of each event
 * (multi-line data joined with newlines). Used by the load generator and the end-to-end tests, the
 * clients of fusedge's streaming API that live in this repository.
 */
export async function* sseData(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, at);
      buf = buf.slice(at + 2);
      yield frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
    }
  }
}
