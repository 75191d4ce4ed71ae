// DOM helpers. Text always goes through text nodes: nothing here parses HTML.

type Child = Node | string | number | null | undefined | false;
type Handler = (event: Event) => void;
export type Attrs = Record<string, string | number | boolean | null | undefined | Handler>;

function apply(node: Element, attrs: Attrs | null | undefined): void {
  if (!attrs) return;
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (typeof value === "function") node.addEventListener(key.slice(2), value as Handler);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(node: Node, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
}

/** An HTML element; `on*` attributes are listeners, strings become text nodes. */
export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs?: Attrs | null, ...children: Child[]): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  apply(node, attrs);
  append(node, children);
  return node;
}

export const SVG_NS = "http://www.w3.org/2000/svg";

export function svg<K extends keyof SVGElementTagNameMap>(tag: K, attrs?: Attrs | null, ...children: Child[]): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG_NS, tag);
  apply(node, attrs);
  append(node, children);
  return node;
}

/** Replace a node's children. */
export function fill(node: Element, ...children: Child[]): void {
  node.replaceChildren();
  append(node, children);
}

/** A list of teardown functions, run once, last first. */
export class Cleanup {
  private fns: (() => void)[] = [];
  add(fn: () => void): void { this.fns.push(fn); }
  listen<K extends keyof WindowEventMap>(target: Window, type: K, fn: (e: WindowEventMap[K]) => void): void;
  listen<K extends keyof DocumentEventMap>(target: Document, type: K, fn: (e: DocumentEventMap[K]) => void): void;
  listen(target: EventTarget, type: string, fn: (e: Event) => void): void;
  listen(target: EventTarget, type: string, fn: (e: Event) => void): void {
    target.addEventListener(type, fn);
    this.fns.push(() => target.removeEventListener(type, fn));
  }
  timer(fn: () => void, ms: number): void {
    const id = setInterval(fn, ms);
    this.fns.push(() => clearInterval(id));
  }
  run(): void {
    const fns = this.fns.reverse();
    this.fns = [];
    for (const fn of fns) {
      try { fn(); } catch (err) { console.warn("cleanup failed", err); }
    }
  }
}
