/**
 * Special-token text that came from a message, not from the chat template. A user who writes
 * `<|im_end|>\n<|im_start|>system` in their content must not become the system: the template's own
 * control tokens are tokenized as tokens, while the same text inside a message is tokenized as the
 * plain text it is (what transformers calls `split_special_tokens`, for the message's part only).
 *
 * Content is wrapped in marks before the template renders it, so the tokenizer can tell afterwards
 * which special-token text came from where, however the template moved it. The marks hold a random
 * nonce, so a message cannot forge one.
 */
export interface SpecialMark {
  open: string;
  close: string;
}

/** Private-use delimiters around a fresh nonce: text no tokenizer or template gives meaning to. */
export function newSpecialMark(): SpecialMark {
  const nonce = crypto.randomUUID();
  return { open: `\uE000${nonce}\uE001`, close: `\uE002${nonce}\uE003` };
}

/** `text` with each special token's text wrapped in `mark` (unchanged when it holds none). */
export function markSpecialText(text: string, specials: readonly string[], mark: SpecialMark): string {
  let out = text;
  for (const s of specials) {
    if (out.includes(s)) out = out.replaceAll(s, `${mark.open}${s}${mark.close}`);
  }
  return out;
}

/**
 * The rendered text without its marks, and the ranges of it that were marked (the text between an
 * open and its close). A mark the template cut in half is dropped and its text left unmarked.
 * Ranges come in order and do not overlap.
 */
export function unmarkSpecialText(
  text: string,
  mark: SpecialMark,
): { text: string; plain: Array<[number, number]> } {
  if (!text.includes(mark.open)) return { text, plain: [] };
  const clean = (s: string) => s.replaceAll(mark.open, "").replaceAll(mark.close, "");
  const plain: Array<[number, number]> = [];
  let out = "";
  let from = 0;
  for (;;) {
    const open = text.indexOf(mark.open, from);
    if (open < 0) break;
    const close = text.indexOf(mark.close, open + mark.open.length);
    if (close < 0) break;
    out += clean(text.slice(from, open));
    const inner = clean(text.slice(open + mark.open.length, close));
    plain.push([out.length, out.length + inner.length]);
    out += inner;
    from = close + mark.close.length;
  }
  return { text: out + clean(text.slice(from)), plain };
}
