/** A small typed emitter: `on()` returns its unsubscribe. */

export type Handler<T> = (value: T) => void;

export class Emitter<Events> {
  #handlers = new Map<keyof Events, Set<Handler<never>>>();

  on<K extends keyof Events>(type: K, handler: Handler<Events[K]>): () => void {
    let set = this.#handlers.get(type);
    if (set === undefined) this.#handlers.set(type, (set = new Set()));
    // A wrapper per call: the same function subscribed twice is called twice and unsubscribed once.
    const entry: Handler<Events[K]> = (value) => handler(value);
    set.add(entry as Handler<never>);
    return () => void set.delete(entry as Handler<never>);
  }

  /**
   * Calls each handler in subscription order. A handler that throws does not stop
   * the others nor the session: its error is re-thrown on its own, outside, so it
   * shows up where uncaught errors do.
   */
  emit<K extends keyof Events>(type: K, value: Events[K]): void {
    const set = this.#handlers.get(type);
    if (set === undefined) return;
    for (const handler of [...set]) {
      try {
        (handler as Handler<Events[K]>)(value);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  clear(): void {
    this.#handlers.clear();
  }
}
