// Fails (exit 1) when the modules under src/ or bench/ import each other in a circle.
// Every kind of import counts: static, `import type`, re-exports and dynamic `import()`,
// since each shapes the design as much as the others. Run by `npm run lint`.
// ESLint's built-in rules see one file at a time, and a cycle is a property of the graph,
// hence this small script rather than a plugin (none is installed; see docs/architecture.md).
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import ts from 'typescript';

const ROOT = resolve(dirname(new URL(import.meta.url).pathname), '..');
const DIRS = process.argv.length > 2 ? process.argv.slice(2) : ['src', 'bench'];

function listTs(dir: string, out: string[] = []): string[] {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) listTs(path, out);
    else if (name.endsWith('.ts') && !name.endsWith('.d.ts')) out.push(path);
  }
  return out;
}

/** The repository files `file` imports (relative specifiers only; packages cannot cycle back). */
function importsOf(file: string): string[] {
  const info = ts.preProcessFile(readFileSync(file, 'utf8'), true, true);
  const found: string[] = [];
  for (const { fileName } of info.importedFiles) {
    if (!fileName.startsWith('.')) continue;
    const target = resolve(dirname(file), fileName.replace(/\.js$/, '.ts'));
    found.push(target);
  }
  return found;
}

const files = DIRS.flatMap((d) => listTs(join(ROOT, d)));
const known = new Set(files);
const edges = new Map(files.map((f) => [f, importsOf(f).filter((t) => known.has(t))]));

// Tarjan's strongly connected components: any component of more than one file, or a file
// importing itself, is a cycle.
let counter = 0;
const index = new Map<string, number>();
const low = new Map<string, number>();
const stack: string[] = [];
const onStack = new Set<string>();
const components: string[][] = [];

function visit(v: string): void {
  index.set(v, counter);
  low.set(v, counter);
  counter++;
  stack.push(v);
  onStack.add(v);
  for (const w of edges.get(v) ?? []) {
    if (!index.has(w)) {
      visit(w);
      low.set(v, Math.min(low.get(v)!, low.get(w)!));
    } else if (onStack.has(w)) {
      low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
  }
  if (low.get(v) === index.get(v)) {
    const component: string[] = [];
    let w: string;
    do {
      w = stack.pop()!;
      onStack.delete(w);
      component.push(w);
    } while (w !== v);
    if (component.length > 1 || (edges.get(v) ?? []).includes(v)) components.push(component);
  }
}

for (const f of files) if (!index.has(f)) visit(f);

/** One concrete circle through the component, for the message. */
function circleIn(component: string[]): string[] {
  const members = new Set(component);
  const start = component[component.length - 1]!;
  const path = [start];
  const seen = new Set([start]);
  const walk = (v: string): boolean => {
    for (const w of edges.get(v) ?? []) {
      if (!members.has(w)) continue;
      if (w === start) return true;
      if (seen.has(w)) continue;
      seen.add(w);
      path.push(w);
      if (walk(w)) return true;
      path.pop();
    }
    return false;
  };
  walk(start);
  return [...path, start];
}

const rel = (f: string) => relative(ROOT, f);
if (components.length > 0) {
  for (const c of components) {
    console.error(`import cycle among ${c.length} files: ${c.map(rel).sort().join(', ')}`);
    console.error(`  e.g. ${circleIn(c).map(rel).join(' -> ')}`);
  }
  process.exitCode = 1;
} else {
  console.log(`no import cycles in ${files.length} files under ${DIRS.join(', ')}`);
}
