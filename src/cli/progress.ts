/** Progress on stderr, at most every 5%, so long runs show they are alive without flooding logs. */
export function progressPrinter(label: string): (done: number, total: number) => void {
  let last = -1;
  const t0 = performance.now();
  return (done, total) => {
    const pct = Math.floor((done / total) * 20);
    if (pct === last && done !== total) return;
    last = pct;
    const s = ((performance.now() - t0) / 1000).toFixed(1);
    console.error(`${label}: ${done}/${total} (${Math.round((done / total) * 100)}%, ${s}s)`);
  };
}
