import { analyzeCommand } from "./src/cli/analyze.ts";
import { benchCommand } from "./src/cli/bench.ts";
import { evalCommand } from "./src/cli/eval.ts";
import { exportCommand } from "./src/cli/export.ts";
import { type Command, commandUsage, parseCommandFlags } from "./src/cli/flags.ts";
import { generateCommand } from "./src/cli/generate.ts";
import { logitsCommand } from "./src/cli/logits.ts";
import { serveCommand } from "./src/cli/serve.ts";
import { InputError, UserError } from "./src/errors.ts";
import { TEMPLATE_RENDERER_ARG } from "./src/serving/template_protocol.ts";
import { renderTemplates } from "./src/workers/template_process.ts";

const COMMANDS: Command[] = [
  serveCommand,
  generateCommand,
  logitsCommand,
  analyzeCommand,
  evalCommand,
  benchCommand,
  exportCommand,
];

const HEADER = `fusedge: FFN Fusion inference for Llama-family models on WebGPU / WASM

usage: fusedge <command> [flags]`;

/** The commands, one line each; a command's flags are its own --help (generated from its schema). */
export function usage(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length)) + 2;
  return [
    HEADER,
    "",
    "commands:",
    ...COMMANDS.map((c) => `  ${c.name.padEnd(width)}${c.summary}`),
    "",
    "fusedge <command> --help lists a command's flags, their defaults and what they do.",
  ].join("\n");
}

const wantsHelp = (args: string[]) => args.some((a) => a === "--help" || a === "-h");

export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  // A compiled binary starts itself as the chat template's renderer (template_sandbox.ts).
  if (name === TEMPLATE_RENDERER_ARG) {
    await renderTemplates();
    return 0;
  }
  if (!name || name === "--help" || name === "-h" || name === "help") {
    console.log(usage());
    return name ? 0 : 2;
  }
  const command = COMMANDS.find((c) => c.name === name);
  if (!command) {
    console.error(`error: unknown command "${name}"\n\n${usage()}`);
    return 2;
  }
  if (wantsHelp(rest)) {
    console.log(`usage: fusedge ${command.name} [flags]\n\n${commandUsage(command)}`);
    return 0;
  }
  let flags: Parameters<typeof command.run>[0];
  try {
    flags = parseCommandFlags(command, rest);
  } catch (e) {
    if (!(e instanceof InputError)) throw e;
    console.error(`error: ${e.message}\n(fusedge ${command.name} --help lists its flags)`);
    return 2;
  }
  try {
    await command.run(flags);
    return 0;
  } catch (e) {
    if (e instanceof UserError) {
      const field = e instanceof InputError && e.field ? `--${e.field.replaceAll("_", "-")}: ` : "";
      console.error(`error: ${field}${e.message}`);
      return 2;
    }
    console.error(e);
    return 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
