/**
 * The chat template's renderer, a process of its own (template_sandbox.ts starts it): templates come
 * inside the checkpoints people download, Jinja has loops, and one render may never end or may fill
 * memory. In a worker thread such a render stalled the serving thread (the isolates of one process
 * share the collector's threads: gaps between a stream's tokens beyond tests/hostile_test.ts's bound
 * on 2 cores), and a heap
 * that runs out aborts the whole process. Here it costs its own process alone, whose heap V8 caps
 * and which runs with no permissions (`deno run`) or none that it uses (a compiled binary).
 * Its protocol is src/serving/template_protocol.ts.
 */
import { ChatTemplate } from "../model/chat_template.ts";
import { markSpecialText } from "../model/special_text.ts";
import { inlineTools, templateKnowsTools, templateTools } from "../model/tool_calls.ts";
import {
  lines,
  type TemplateProcessData,
  type TemplateReply,
  type TemplateRequest,
} from "../serving/template_protocol.ts";
import { toWorkerError } from "./worker_error.ts";

export async function renderTemplates(): Promise<void> {
  const out = Deno.stdout.writable.getWriter();
  const encoder = new TextEncoder();
  const post = (m: TemplateReply) => out.write(encoder.encode(JSON.stringify(m) + "\n"));
  const input = lines(Deno.stdin.readable);
  const first = await input.next();
  if (first.done) return;
  const { src, protect } = JSON.parse(first.value) as TemplateProcessData;
  // Every string a request wrote (contents, names, earlier calls' arguments, tool descriptions).
  const mark = <T>(value: T): T => {
    if (!protect) return value;
    if (typeof value === "string") return markSpecialText(value, protect.specials, protect.mark) as T;
    if (Array.isArray(value)) return value.map(mark) as T;
    if (value && typeof value === "object") {
      return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, mark(v)])) as T;
    }
    return value;
  };
  const ownTools = templateKnowsTools(src.source);
  const render = (m: Extract<TemplateRequest, { type: "render" }>) => {
    const tools = m.tools && mark(m.tools);
    const messages = mark(m.messages);
    if (tools && ownTools) {
      return template.render(messages, m.addGenerationPrompt, { tools: templateTools(tools) });
    }
    return template.render(tools ? inlineTools(messages, tools) : messages, m.addGenerationPrompt);
  };
  let template: ChatTemplate;
  try {
    template = ChatTemplate.compile(src);
  } catch (e) {
    await post({ type: "failed", id: null, ...toWorkerError(e) });
    return;
  }
  await post({ type: "ready" });
  for await (const line of input) {
    const m = JSON.parse(line) as TemplateRequest;
    try {
      const text = m.type === "endOfTurn" ? template.endOfTurn() : render(m);
      await post({ type: "rendered", id: m.id, text });
    } catch (e) {
      await post({ type: "failed", id: m.id, ...toWorkerError(e) });
    }
  }
}

if (import.meta.main) await renderTemplates();
