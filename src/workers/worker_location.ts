/**
 * Imported first by every worker that loads onnxruntime-web. A Deno worker started from a file: URL
 * has `location.origin === "null"`, and onnxruntime-web resolves its own URL against that origin at
 * import time, which throws. Without a location it takes the path it uses outside browsers.
 */
const desc = Object.getOwnPropertyDescriptor(globalThis, "location");
if (desc?.configurable && globalThis.location?.origin === "null") {
  Object.defineProperty(globalThis, "location", { value: undefined, configurable: true });
}
