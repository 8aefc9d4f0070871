/** The messages between the serving thread's tokenizer (remote_tokenizer.ts) and its worker. */
import type { SpecialMark } from "../model/special_text.ts";
import type { WorkerError } from "../workers/worker_error.ts";

export type TokenizerRequest =
  | { type: "load"; dir: string }
  /** `mark`: the text is a rendered chat whose messages' special-token text is marked (special_text.ts). */
  | { type: "encode"; id: number; text: string; mark?: SpecialMark }
  | { type: "decode"; id: number; ids: number[] };

export type TokenizerReply =
  | { type: "loaded"; maxTokenChars: number; vocabSize: number; specials: string[]; specialIds: number[] }
  | { type: "encoded"; id: number; ids: number[] }
  | { type: "decoded"; id: number; text: string }
  | { type: "failed"; id: number | null } & WorkerError;
