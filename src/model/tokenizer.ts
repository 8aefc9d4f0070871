import { Tokenizer } from "@huggingface/tokenizers";
import { join } from "node:path";
import { BadCheckpointError } from "../errors.ts";

/** The checkpoint's tokenizer.json (byte-level BPE and friends) through @huggingface/tokenizers. */
export class TextTokenizer {
  /** Each id's text and bytes, as logprobs report them (looked up again for every top candidate). */
  private readonly pieces = new Map<number, TokenPiece>();
  /** Added tokens by id (the library builds this map afresh on every call). */
  private readonly added: ReturnType<Tokenizer["get_added_tokens_decoder"]>;

  private constructor(
    private readonly tok: Tokenizer,
    readonly vocabSize: number,
    /** Byte-level BPE: vocabulary strings stand for bytes through GPT-2's printable byte map. */
    private readonly byteLevel: boolean,
  ) {
    this.added = tok.get_added_tokens_decoder();
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
