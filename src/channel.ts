/** Items handed from callbacks (a worker's messages, an engine's handlers) to an async consumer, in order. */
export class Channel<T> {
  private readonly items: T[] = [];
  private wake: (() => void) | null = null;

  put(item: T): void {
    this.items.push(item);
    this.wake?.();
    this.wake = null;
  }

  async take(): Promise<T> {
    while (this.items.length === 0) await new Promise<void>((r) => (this.wake = r));
    return this.items.shift()!;
  }
}
