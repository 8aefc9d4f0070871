import { Tokenizer } from "@huggingface/tokenizers";
import { join } from "node:path";
import { BadCheckpointError } from "../errors.ts";
import { type SpecialMark, unmarkSpecialText } from "./special_text.ts";

type AddedToken = ReturnType<Tokenizer["get_added_tokens_decoder"]> extends Map<number, infer T> ? T : never;

/** The checkpoint's tokenizer.json (byte-level BPE and friends) through @huggingface/tokenizers. */
export class TextTokenizer {
  /** Each id's text and bytes, as logprobs report them (looked up again for every top candidate). */
  private readonly pieces = new Map<number, TokenPiece>();
  /** Added tokens by id (the library builds this map afresh on every call). */
  private readonly added: ReturnType<Tokenizer["get_added_tokens_decoder"]>;
  /** Added tokens by the text they are matched as: the raw text, or the text after normalizing. */
  private readonly rawAdded = new Map<string, AddedToken>();
  private readonly normalizedAdded = new Map<string, AddedToken>();

  private constructor(
    private readonly tok: Tokenizer,
    readonly vocabSize: number,
    /** Byte-level BPE: vocabulary strings stand for bytes through GPT-2's printable byte map. */
    private readonly byteLevel: boolean,
  ) {
    this.added = tok.get_added_tokens_decoder();
    for (const t of this.added.values()) {
      if (t.normalized && tok.normalizer) this.normalizedAdded.set(tok.normalizer._call(t.content), t);
      else this.rawAdded.set(t.content, t);
    }
  }

  static async load(dir: string): Promise<TextTokenizer> {
    const path = join(dir, "tokenizer.json");
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(await Deno.readTextFile(path));
    } catch (e) {
      throw new BadCheckpointError(`cannot load ${path}: ${(e as Error).message}`);
    }
    let configJson: Record<string, unknown> = {};
    try {
      configJson = JSON.parse(await Deno.readTextFile(join(dir, "tokenizer_config.json")));
    } catch {
      // tokenizer_config.json is optional: tokenizer.json alone defines the byte-level BPE.
    }
    try {
      const tok = new Tokenizer(json, configJson);
      return new TextTokenizer(
        tok,
        tok.get_vocab(true).size,
        JSON.stringify(json.decoder ?? "").includes("ByteLevel"),
      );
    } catch (e) {
      throw new BadCheckpointError(`${path}: unsupported or malformed tokenizer (${(e as Error).message})`);
    }
  }

  /**
   * An upper bound on the characters one token stands for: the longest vocabulary entry (byte-level
   * entries are one character a byte, and a byte is at least one UTF-16 unit of text or none).
   * Added tokens count too, since they are matched in prompts as written.
   */
  maxTokenChars(): number {
    let max = 1;
    for (const token of this.tok.get_vocab(true).keys()) max = Math.max(max, token.length);
    return max;
  }

  /** Encodes without adding special tokens: prompts are continued exactly as written. */
  encode(text: string): number[] {
    return this.tok.encode(text, { add_special_tokens: false }).ids;
  }

  /**
   * Every id's token string as the constrained decoder reads it, `size` wide (the model's logits may
   * be wider than the vocabulary), and how token strings stand for bytes.
   */
  vocabularyInfo(size: number): { tokens: string[]; kind: "byte_level" | "byte_fallback" | "raw" } {
    const tokens = Array.from({ length: size }, (_, id) => this.tok.id_to_token(id) ?? "");
    const kind = this.byteLevel
      ? "byte_level"
      : this.tok.token_to_id("<0x00>") !== undefined
      ? "byte_fallback"
      : "raw";
    return { tokens, kind };
  }

  /** The texts of the special tokens (BOS, EOS, end-of-turn markers): what a message may not inject. */
  specialTexts(): string[] {
    return [...this.added.values()].filter((t) => t.special).map((t) => t.content);
  }

  specialIds(): number[] {
    return [...this.added.values()].filter((t) => t.special).map((t) => t.id);
  }

  /**
   * Encodes a rendered chat: special-token text inside `mark` (a message's) is tokenized as plain
   * text, the rest as `encode` does. Special tokens the tokenizer matches only after normalizing are
   * matched everywhere (Llama, Qwen and Mistral tokenizers match theirs in the raw text).
   */
  encodeMarked(rendered: string, mark: SpecialMark): number[] {
    const { text, plain } = unmarkSpecialText(rendered, mark);
    return plain.length ? this.encodeSections(text, plain) : this.encode(text);
  }

  /**
   * `encode`'s own steps (the library's encode_text), with the added tokens inside `plain` ranges
   * left as text: split at added tokens, strip around those that ask for it, then normalize,
   * pre-tokenize (knowing each section's index, as Metaspace's "first" needs) and run the model.
   */
  private encodeSections(text: string, plain: Array<[number, number]>): number[] {
    const sections = splitAdded(text, this.rawAdded, plain);
    stripAround(sections);
    const ids: number[] = [];
    const model = this.tok.model!;
    sections.forEach((section, index) => {
      if (section.token) return void ids.push(section.token.id);
      const normalized = this.tok.normalizer ? this.tok.normalizer._call(section.text) : section.text;
      const parts = splitAdded(normalized, this.normalizedAdded, []);
      stripAround(parts);
      for (const part of parts) {
        if (part.token) ids.push(part.token.id);
        else if (part.text) {
          const words = this.tok.pre_tokenizer
            ? this.tok.pre_tokenizer._call(part.text, { section_index: index })
            : [part.text];
          for (const t of model._call(words)) {
            ids.push(this.rawAdded.get(t)?.id ?? model.tokens_to_ids.get(t) ?? model.unk_token_id!);
          }
        }
      }
    });
    return ids;
  }

  decode(ids: number[], skipSpecial = true): string {
    if (ids.length === 0) return "";
    return this.tok.decode(ids, { skip_special_tokens: skipSpecial, clean_up_tokenization_spaces: false });
  }

  /** Whether `id` is an added special token (end-of-turn markers, BOS, EOS). */
  isSpecial(id: number): boolean {
    return this.added.get(id)?.special ?? false;
  }

  /**
   * One token as OpenAI's logprobs show it: its text alone (U+FFFD where it holds part of a
   * character) and its exact bytes, which is how a client puts split characters back together.
   */
  piece(id: number): TokenPiece {
    let p = this.pieces.get(id);
    if (!p) {
      const text = this.decode([id], false);
      const raw = this.tok.id_to_token(id) ?? "";
      const hex = /^<0x([0-9A-Fa-f]{2})>$/.exec(raw);
      const bytes = this.byteLevel && !this.isSpecial(id) && [...raw].every((c) => BYTE_OF.has(c))
        ? [...raw].map((c) => BYTE_OF.get(c)!)
        : hex
        ? [parseInt(hex[1], 16)]
        : [...new TextEncoder().encode(text)];
      p = { text, bytes };
      this.pieces.set(id, p);
    }
    return p;
  }

  /** A decoder that yields text as soon as it is complete UTF-8 (byte-level BPE splits characters). */
  streamDecoder(): StreamDecoder {
    return new StreamDecoder(this);
  }
}

interface Section {
  text: string;
  token?: AddedToken;
}

/** Splits at the longest added token starting at each place, except inside `plain` ranges (ordered). */
function splitAdded(text: string, added: Map<string, AddedToken>, plain: Array<[number, number]>): Section[] {
  if (added.size === 0) return [{ text }];
  const lengths = [...new Set([...added.keys()].map((k) => k.length))].sort((a, b) => b - a);
  const out: Section[] = [];
  let start = 0;
  let range = 0;
  for (let i = 0; i < text.length;) {
    while (range < plain.length && plain[range][1] <= i) range++;
    if (range < plain.length && plain[range][0] <= i) {
      i = plain[range][1];
      continue;
    }
    const limit = range < plain.length ? plain[range][0] : text.length;
    const len = lengths.find((n) => i + n <= limit && added.has(text.slice(i, i + n)));
    if (len === undefined) {
      i++;
      continue;
    }
    if (i > start) out.push({ text: text.slice(start, i) });
    out.push({ text: text.slice(i, i + len), token: added.get(text.slice(i, i + len)) });
    i += len;
    start = i;
  }
  if (start < text.length) out.push({ text: text.slice(start) });
  return out;
}

/** An added token with lstrip/rstrip eats the whitespace beside it, as the library's split does. */
function stripAround(sections: Section[]): void {
  sections.forEach((s, i) => {
    if (s.token?.lstrip && i > 0) sections[i - 1].text = sections[i - 1].text.trimEnd();
    if (s.token?.rstrip && i < sections.length - 1) sections[i + 1].text = sections[i + 1].text.trimStart();
  });
}

export interface TokenPiece {
  text: string;
  bytes: number[];
}

/**
 * GPT-2's byte-level alphabet read backwards: printable bytes stand for themselves, the others were
 * shifted to code points from 256 up, in byte order.
 */
const BYTE_OF = (() => {
  const map = new Map<string, number>();
  let shifted = 256;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    map.set(String.fromCodePoint(printable ? b : shifted++), b);
  }
  return map;
})();

/**
 * Incremental detokenisation: decodes a short window of recent ids and emits only what became final,
 * holding back a trailing replacement character that more bytes may still complete.
 */
export class StreamDecoder {
  private ids: number[] = [];
  private prefixOffset = 0;
  private readOffset = 0;

  constructor(private readonly tok: TextTokenizer) {}

  push(id: number): string {
    this.ids.push(id);
    const prefix = this.tok.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const text = this.tok.decode(this.ids.slice(this.prefixOffset));
    if (text.length > prefix.length && !text.endsWith("\uFFFD")) {
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      return text.slice(prefix.length);
    }
    return "";
  }

  /** Whatever is still held back (an incomplete character at the very end becomes U+FFFD). */
  flush(): string {
    const prefix = this.tok.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const text = this.tok.decode(this.ids.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset = this.ids.length;
    return text.slice(prefix.length);
  }
}
