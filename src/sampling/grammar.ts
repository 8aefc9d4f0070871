// The package's bundle is UMD (CommonJS when `module` exists) under a package.json that says
// "type": "module", so Deno can import it neither way: it is read as text and run as CommonJS.
import xgrammarSource from "@mlc-ai/web-xgrammar/lib/index.js" with { type: "text" };
import { createRequire } from "node:module";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import type * as XG from "@mlc-ai/web-xgrammar/lib/index.js";
import { InputError } from "../errors.ts";

/**
 * What a request constrains its output to: JSON (any object), a JSON schema (its text), a regular
 * expression, one of a list of strings, or an EBNF grammar; `field` is the request field it came
 * from, named when it cannot be compiled.
 */
export type GrammarSpec =
  & { field: string }
  & (
    | { type: "json" }
    | { type: "json_schema"; schema: string }
    | { type: "regex"; pattern: string }
    | { type: "choice"; choices: string[] }
    | { type: "ebnf"; grammar: string }
    /** xgrammar's structural tag (its JSON text): free text around tagged, constrained parts. */
    | { type: "structural_tag"; tag: string }
  );

type XGrammar = typeof XG;

let loaded: XGrammar | null = null;
/** What xgrammar last reported as fatal: its reason for refusing a schema or grammar. */
let lastFatal = "";

function xgrammar(): XGrammar {
  if (loaded) return loaded;
  // xgrammar's WebAssembly build prints why it refuses a grammar ("[FATAL] file:line: reason", then
  // "Aborted()") and throws a bare "Aborted()": its reports are kept for the 400 instead of the log.
  // It binds console.error when its module starts, at the first call, so the filter stays.
  const print = console.error;
  console.error = (...args: unknown[]) => {
    const text = args.map(String).join(" ");
    const fatal = /^\[FATAL\] \S+:\d+: (.*)$/s.exec(text);
    if (fatal) lastFatal = fatal[1].trim();
    else if (text !== "Aborted()") print(...args);
  };
  const module = { exports: {} as XGrammar };
  const here = fileURLToPath(import.meta.url);
  new Function("exports", "require", "module", "__filename", "__dirname", xgrammarSource)(
    module.exports,
    createRequire(import.meta.url),
    module,
    here,
    dirname(here),
  );
  return loaded = module.exports;
}

/** The vocabulary as xgrammar reads it: each id's token string, and how strings stand for bytes. */
export interface VocabularyInfo {
  /** By id, as wide as the model's logits ("" where the tokenizer has no token). */
  tokens: string[];
  /** "byte_level" (GPT-2's byte map), "byte_fallback" (<0xNN> pieces), or "raw". */
  kind: "byte_level" | "byte_fallback" | "raw";
}

/** xgrammar's indent for JSON on one line, items after ", " and values after ": " (its default is 2). */
const ONE_LINE = -1;

/**
 * A structural tag whose JSON parts allow no free whitespace, as `json_schema` requests are compiled:
 * the tag's own `json_schema` format lets a model pad with spaces and newlines without end, which a
 * small or fused model does. Each is replaced by its grammar, compiled as compileJSONSchema is.
 */
async function tightJson(node: unknown): Promise<unknown> {
  if (Array.isArray(node)) return await Promise.all(node.map(tightJson));
  if (!node || typeof node !== "object") return node;
  const o = node as Record<string, unknown>;
  if (o.type === "json_schema" && "json_schema" in o) {
    const grammar = await xgrammar().Grammar.fromJSONSchema(
      JSON.stringify(o.json_schema),
      false,
      ONE_LINE,
      undefined,
      true,
    );
    return { type: "grammar", grammar: grammar.toString() };
  }
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) out[k] = await tightJson(v);
  return out;
}

/** A JSON string as EBNF's quoted literal. */
const literal = (s: string) => JSON.stringify(s);

/** EBNF for exactly one of `choices`. */
const choiceGrammar = (choices: string[]) => `root ::= ${choices.map(literal).join(" | ")}`;

/** A spec as one part of a structural tag (an answer that is either tool calls or this). */
export function asTagFormat(spec: GrammarSpec): Record<string, unknown> {
  switch (spec.type) {
    case "json":
      return { type: "json_schema", json_schema: { type: "object" } };
    case "json_schema":
      return { type: "json_schema", json_schema: JSON.parse(spec.schema) };
    case "regex":
      return { type: "regex", pattern: spec.pattern };
    case "choice":
      return { type: "grammar", grammar: choiceGrammar(spec.choices) };
    case "ebnf":
      return { type: "grammar", grammar: spec.grammar };
    case "structural_tag":
      return (JSON.parse(spec.tag) as { format: Record<string, unknown> }).format;
  }
}

/**
 * Grammars compiled against one vocabulary, cached by their text (least recently used out), and a
 * matcher per constrained sequence. xgrammar (the engine vLLM, SGLang and WebLLM use) computes each
 * step's token mask from the sequence's grammar state.
 */
export class Grammars {
  private compiler: Promise<XG.GrammarCompiler> | null = null;
  private readonly compiled = new Map<string, Promise<XG.CompiledGrammar>>();

  constructor(private readonly vocabulary: () => VocabularyInfo, private readonly cacheSize = 32) {}

  private async grammarCompiler(): Promise<XG.GrammarCompiler> {
    this.compiler ??= (async () => {
      const v = this.vocabulary();
      const { GrammarCompiler, TokenizerInfo } = xgrammar();
      const info = await TokenizerInfo.createTokenizerInfo(v.tokens, v.kind, false, v.tokens.length);
      return await GrammarCompiler.createGrammarCompiler(info);
    })();
    return await this.compiler;
  }

  /** Loads the engine and builds the vocabulary's tables now, so that the first grammar does not wait for them. */
  async prepare(): Promise<void> {
    await this.grammarCompiler();
  }

  /** The spec compiled (once: later calls reuse it); a spec the engine refuses is bad input naming its field. */
  async compile(spec: GrammarSpec): Promise<XG.CompiledGrammar> {
    const key = JSON.stringify({ ...spec, field: undefined });
    let found = this.compiled.get(key);
    if (found) {
      this.compiled.delete(key);
      this.compiled.set(key, found);
      return await found;
    }
    found = this.build(spec);
    this.compiled.set(key, found);
    found.catch(() => this.compiled.delete(key));
    while (this.compiled.size > this.cacheSize) {
      const [oldest, grammar] = this.compiled.entries().next().value!;
      this.compiled.delete(oldest);
      grammar.then((g) => g.dispose(), () => {});
    }
    return await found;
  }

  private async build(spec: GrammarSpec): Promise<XG.CompiledGrammar> {
    const compiler = await this.grammarCompiler();
    try {
      switch (spec.type) {
        case "json":
          return await compiler.compileBuiltinJSONGrammar();
        case "json_schema":
          return await compiler.compileJSONSchema(spec.schema, false, ONE_LINE, undefined, true);
        case "regex":
          return await compiler.compileStructuralTag({
            type: "structural_tag",
            format: { type: "regex", pattern: spec.pattern },
          } as XG.StructuralTagLike);
        case "choice":
          return await compiler.compileGrammar(choiceGrammar(spec.choices));
        case "ebnf":
          return await compiler.compileGrammar(spec.grammar);
        case "structural_tag":
          return await compiler.compileStructuralTag(
            await tightJson(JSON.parse(spec.tag)) as XG.StructuralTagLike,
          );
      }
    } catch (e) {
      // Without a reason printed, the WebAssembly build throws a bare number (its exception's address).
      const why = lastFatal ||
        (typeof e === "number" ? "the grammar engine refused it" : (e as Error).message);
      lastFatal = "";
      throw new InputError(`cannot be compiled: ${why}`.slice(0, 2000), spec.field);
    }
  }

  /** A sequence's matcher; `stopIds` end it (EOS, a chat's end-of-turn token) once the grammar is complete. */
  async matcher(spec: GrammarSpec, stopIds: number[]): Promise<GrammarState> {
    const { GrammarMatcher } = xgrammar();
    return new GrammarState(await GrammarMatcher.createGrammarMatcher(await this.compile(spec), stopIds));
  }
}

/** One sequence's place in its grammar: which tokens may come next, and each token it took. */
export class GrammarState {
  constructor(private readonly matcher: XG.GrammarMatcher) {}

  /** The tokens the grammar allows next: bit i of word i / 32 for id i. */
  async bitmask(): Promise<Int32Array> {
    return await this.matcher.getNextTokenBitmask();
  }

  /** Sets the logits of every token the grammar does not allow next to -Infinity. */
  async mask(row: Float32Array): Promise<void> {
    const bits = await this.bitmask();
    for (let word = 0; word * 32 < row.length; word++) {
      // Ids past the tokenizer's vocabulary (a padded embedding) are never allowed.
      const w = word < bits.length ? bits[word] : 0;
      if (w === -1) continue;
      const end = Math.min(row.length, (word + 1) * 32);
      // Most words allow nothing (a JSON grammar allows a few hundred of 128K tokens): filled at once.
      if (w === 0) row.fill(-Infinity, word * 32, end);
      else for (let id = word * 32; id < end; id++) if (!(w & (1 << (id & 31)))) row[id] = -Infinity;
    }
  }

  /** Takes the chosen token; false when the grammar did not allow it. */
  accept(id: number): boolean {
    return this.matcher.acceptToken(id);
  }

  dispose(): void {
    this.matcher.dispose();
  }
}
