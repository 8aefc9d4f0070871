/**
 * Samples every case `warmups` times, then once per round for `rounds` rounds, the order flipped
 * every other round, so that the machine's drift falls on all cases alike. Returns each case's
 * samples from the rounds, in case order.
 */
export async function inRounds<C, S>(
  cases: C[],
  rounds: number,
  sample: (c: C) => Promise<S>,
  warmups = 1,
): Promise<S[][]> {
  for (const c of cases) for (let w = 0; w < warmups; w++) await sample(c);
  const samples = cases.map(() => [] as S[]);
  for (let round = 0; round < rounds; round++) {
    const order = cases.map((_, i) => i);
    if (round % 2) order.reverse();
    for (const i of order) samples[i].push(await sample(cases[i]));
  }
  return samples;
}
