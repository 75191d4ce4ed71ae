// A store: get, set (a shallow patch), subscribe. Subscribers get the new and the previous state.
export interface Store<S extends object> {
  get(): S;
  set(patch: Partial<S>): void;
  subscribe(fn: (state: S, prev: S) => void): () => void;
}

export function createStore<S extends object>(initial: S): Store<S> {
  let state = initial;
  const subscribers = new Set<(state: S, prev: S) => void>();
  return {
    get: () => state,
    set(patch) {
      const prev = state;
      state = { ...state, ...patch };
      for (const fn of [...subscribers]) fn(state, prev);
    },
    subscribe(fn) {
      subscribers.add(fn);
      return () => { subscribers.delete(fn); };
    },
  };
}
