import { Tokenizer } from "@huggingface/tokenizers";
import { join } from "node:path";
import { BadCheckpointError } from "../errors.ts";

/** The checkpoint's tokenizer.json (byte-level BPE and friends) through @huggingface/tokenizers. */
export class TextTokenizer {
  private constructor(private readonly tok: Tokenizer, readonly vocabSize: number) {}

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
      return new TextTokenizer(tok, tok.get_vocab(true).size);
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

  /** A decoder that yields text as soon as it is complete UTF-8 (byte-level BPE splits characters). */
  streamDecoder(): StreamDecoder {
    return new StreamDecoder(this);
  }
}

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
