import { analyzeCommand } from "./src/cli/analyze.ts";
import { benchCommand } from "./src/cli/bench.ts";
import { evalCommand } from "./src/cli/eval.ts";
import { generateCommand } from "./src/cli/generate.ts";
import { logitsCommand } from "./src/cli/logits.ts";
import { serveCommand } from "./src/cli/serve.ts";
import { InputError } from "./src/errors.ts";

const USAGE = `fusedge: FFN Fusion inference for Llama-family models on WebGPU / WASM

usage: fusedge <command> [flags]

commands:
  serve     --model DIR [--port 8000] [--host 127.0.0.1] [--plan FILE] [--device auto|webgpu|wasm]
  generate  --model DIR --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K] [--top-p P]
            [--repetition-penalty R] [--seed S] [--stop STR]... [--plan FILE] [--device ...]
  logits    --model DIR --prompt TEXT [--plan FILE] [--device ...]
  analyze   --model DIR --text FILE [--max-tokens 256] [--skip-tokens 0] [--window 256]
            [--max-width 4] [--threshold 0.2] [--svg FILE]
  eval      --model DIR --text FILE [--plan FILE] [--max-tokens 256] [--skip-tokens 0] [--window 256]

  bench     [--model DIR | --preset tiny-nas|llama-1b|llama-8b] [--device ...] [--k 4]
            [--tokens 1,8,32,128] [--dtype f16|f32] [--decode-tokens 64] [--json]

--model defaults to the embedded tiny-nas checkpoint (bench: a preset shape unless --model is given).`;

const COMMANDS: Record<string, (argv: string[]) => Promise<void>> = {
  serve: serveCommand,
  generate: generateCommand,
  logits: logitsCommand,
  analyze: analyzeCommand,
  eval: evalCommand,
  bench: benchCommand,
};

async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    console.log(USAGE);
    return name ? 0 : 2;
  }
  const command = COMMANDS[name];
  if (!command) {
    console.error(`error: unknown command "${name}"\n\n${USAGE}`);
    return 2;
  }
  try {
    await command(rest);
    return 0;
  } catch (e) {
    if (e instanceof InputError) {
      console.error(`error: ${e.message}`);
      return 2;
    }
    console.error(e);
    return 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
