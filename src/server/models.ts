import type { Context } from "hono";
import { NotFoundError } from "../errors.ts";
import type { ModelHost } from "../serving/host.ts";
import type { AppEnv } from "./logging.ts";

/** The served model as OpenAI's model object. */
export function modelObject(host: ModelHost) {
  return {
    id: host.name,
    object: "model",
    created: 0,
    owned_by: "fusedge",
    plan: host.instance?.planId ?? null,
    device: host.device,
    dtype: host.graph.dtype,
    quantize: host.graph.quantize,
    weight_bytes: host.instance?.weightBytes ?? null,
  };
}

/** GET /v1/models (the served model, once loaded) and GET /v1/models/{id} (404 naming any other). */
export function modelRoutes(host: ModelHost) {
  return {
    list: (c: Context<AppEnv>) =>
      c.json({ object: "list", data: host.state === "ready" ? [modelObject(host)] : [] }),
    model: (c: Context<AppEnv>) => {
      host.requireReady();
      const id = c.req.param("id") ?? "";
      if (id !== host.name) throw new NotFoundError(`the model '${id.slice(0, 200)}' does not exist`);
      return c.json(modelObject(host));
    },
  };
}
