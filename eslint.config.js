// @ts-check
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import eslint from '@eslint/js';
import ts from 'typescript';
import tseslint from 'typescript-eslint';

/*
 * The layers of src/ (docs/architecture.md, "Layers"), top to bottom. A module may import its
 * own layer and the layers below it, never one above. Type-only, re-exported and dynamic
 * imports count: they shape the design as much as static ones. A new folder in src/ must be
 * given its place here (and in docs/architecture.md) before anything in it passes lint.
 */
const LAYERS = [
  'cli', //       src/cli/: arguments, output, exit codes
  'index', //     src/index.ts: the library's public API
  'router', //    src/<ROUTERS>: which copy runs (local, push, pull, relay, direct)
  'fanout', //    src/fanout/: one SRC read once for many destinations (copyMany)
  'remote', //    src/remote/: ssh, the protocol, remote copies, the agent
  'engine', //    src/engine/: the pipeline and the operations on it
  'delta', //     src/delta/: blksync publish, and copy from a published image by HTTP ranges
  'containers', // src/containers/: images inside zip, tar, Android sparse, qcow2, VHD, VMDK
  'formats', //   src/formats/: bmap, index and patch files
  'io', //        src/io/: files, devices, streams, http
  'root', //      src/*.ts: shared types, errors, ranges, sizes, hashing
];
/** The files directly in src/ that are routers; every other one there is a root utility. */
const ROUTERS = new Set(['copy.ts']);

const ROOT = import.meta.dirname;
const SRC = path.join(ROOT, 'src');

/** The layer of a file in src/; null for a folder the list does not know; undefined outside src/. */
function layerOf(/** @type {string} */ file) {
  const rel = path.relative(SRC, file);
  if (rel.startsWith('..') || path.isAbsolute(rel)) return undefined;
  const parts = rel.split(path.sep);
  if (parts.length > 1) return LAYERS.includes(parts[0] ?? '') ? parts[0] : null;
  if (rel === 'index.ts') return 'index';
  return ROUTERS.has(rel) ? 'router' : 'root';
}

/** The repository file a relative specifier names (`./x.js` is `./x.ts`); undefined for a package. */
function resolveImport(/** @type {string} */ from, /** @type {string} */ spec) {
  if (!spec.startsWith('.')) return undefined;
  return path.resolve(path.dirname(from), spec.replace(/\.js$/, '.ts'));
}

/**
 * Calls `check(specifier, node)` for every import in a file: `import`, `import type`,
 * `export ... from`, `import()` and `import('x').T` in types.
 * @param {(spec: string, node: import('estree').Node) => void} check
 */
function onEveryImport(check) {
  /** @param {any} node */
  const source = (node) => {
    const lit = node.source ?? node.argument?.literal ?? node.argument;
    if (lit?.type === 'Literal' && typeof lit.value === 'string') check(lit.value, node);
  };
  return {
    ImportDeclaration: source,
    ExportNamedDeclaration: source,
    ExportAllDeclaration: source,
    ImportExpression: source,
    TSImportType: source,
  };
}

/** @type {import('eslint').Rule.RuleModule} */
const layersRule = {
  meta: {
    type: 'problem',
    docs: { description: 'imports in src/ point down the layers of docs/architecture.md' },
    schema: [],
  },
  create(context) {
    const file = context.filename;
    const mine = layerOf(file);
    if (mine === undefined) return {};
    if (mine === null) {
      return {
        Program(node) {
          context.report({
            node,
            message: `${path.relative(ROOT, path.dirname(file))}/ has no place in the layers: add it to LAYERS in eslint.config.js and to docs/architecture.md`,
          });
        },
      };
    }
    return onEveryImport((spec, node) => {
      const target = resolveImport(file, spec);
      if (target === undefined) return;
      const theirs = layerOf(target);
      if (theirs === undefined || theirs === null || theirs === mine) return;
      if (LAYERS.indexOf(theirs) < LAYERS.indexOf(mine)) {
        context.report({
          node,
          message: `${mine} may not import ${theirs} ('${spec}'): imports point down the layers ${LAYERS.join(' → ')} (docs/architecture.md)`,
        });
      }
    });
  },
};

/** The folders whose modules may not import each other in a circle. */
const CYCLE_DIRS = ['src', 'bench', 'test'].map((d) => path.join(ROOT, d));

function listTs(/** @type {string} */ dir, /** @type {string[]} */ out = []) {
  for (const name of readdirSync(dir)) {
    // bench/.data holds generated images and file trees, not the project's modules
    if (name.startsWith('.')) continue;
    const p = path.join(dir, name);
    if (statSync(p).isDirectory()) listTs(p, out);
    else if (name.endsWith('.ts') && !name.endsWith('.d.ts')) out.push(p);
  }
  return out;
}

/** @type {{ stamp: string, cycleOf: Map<string, Set<string>>, edges: Map<string, string[]> } | undefined} */
let graph;

/**
 * The import graph of CYCLE_DIRS (every kind of import, read with TypeScript's pre-processor)
 * and, for each file in a cycle, the files of its cycle (Tarjan's strongly connected
 * components). Rebuilt when a file changed, so an editor's long-running ESLint stays true.
 */
function importGraph() {
  const files = CYCLE_DIRS.flatMap((d) => listTs(d));
  const stamp = files.map((f) => `${f}:${statSync(f).mtimeMs}`).join('\n');
  if (graph?.stamp === stamp) return graph;
  const known = new Set(files);
  /** @type {Map<string, string[]>} */
  const edges = new Map();
  for (const f of files) {
    const info = ts.preProcessFile(readFileSync(f, 'utf8'), true, true);
    const to = info.importedFiles
      .map((i) => resolveImport(f, i.fileName))
      .filter((t) => t !== undefined && known.has(t));
    edges.set(f, /** @type {string[]} */ (to));
  }
  let counter = 0;
  /** @type {Map<string, number>} */ const index = new Map();
  /** @type {Map<string, number>} */ const low = new Map();
  /** @type {string[]} */ const stack = [];
  const onStack = new Set();
  /** @type {Map<string, Set<string>>} */ const cycleOf = new Map();
  const visit = (/** @type {string} */ v) => {
    index.set(v, counter);
    low.set(v, counter++);
    stack.push(v);
    onStack.add(v);
    for (const w of edges.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v) ?? 0, low.get(w) ?? 0));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v) ?? 0, index.get(w) ?? 0));
    }
    if (low.get(v) !== index.get(v)) return;
    const component = new Set();
    let w;
    do {
      w = /** @type {string} */ (stack.pop());
      onStack.delete(w);
      component.add(w);
    } while (w !== v);
    if (component.size > 1 || (edges.get(v) ?? []).includes(v)) {
      for (const m of component) cycleOf.set(m, component);
    }
  };
  for (const f of files) if (!index.has(f)) visit(f);
  graph = { stamp, cycleOf, edges };
  return graph;
}

/** A shortest way back from `from` to `to` inside `members`, for the message. */
function pathBack(
  /** @type {Map<string, string[]>} */ edges,
  /** @type {string} */ from,
  /** @type {string} */ to,
  /** @type {Set<string>} */ members,
) {
  /** @type {Map<string, string>} */
  const prev = new Map([[from, from]]);
  const queue = [from];
  while (queue.length > 0) {
    const v = /** @type {string} */ (queue.shift());
    if (v === to) break;
    for (const w of edges.get(v) ?? []) {
      if (members.has(w) && !prev.has(w)) {
        prev.set(w, v);
        queue.push(w);
      }
    }
  }
  const way = [to];
  for (let v = to; v !== from; v = /** @type {string} */ (prev.get(v)))
    way.unshift(prev.get(v) ?? from);
  return way;
}

/** @type {import('eslint').Rule.RuleModule} */
const noCyclesRule = {
  meta: {
    type: 'problem',
    docs: { description: 'no import cycles among the modules of src/, bench/ and test/' },
    schema: [],
  },
  create(context) {
    const file = context.filename;
    if (!CYCLE_DIRS.some((d) => !path.relative(d, file).startsWith('..'))) return {};
    const { cycleOf, edges } = importGraph();
    const cycle = cycleOf.get(file);
    if (cycle === undefined) return {};
    return onEveryImport((spec, node) => {
      const target = resolveImport(file, spec);
      if (target === undefined || !cycle.has(target)) return;
      const way = [file, ...pathBack(edges, target, file, cycle)];
      context.report({
        node,
        message: `import cycle: ${way.map((f) => path.relative(ROOT, f)).join(' → ')}; move what both need into a module of its own`,
      });
    });
  },
};

export default tseslint.config(
  {
    ignores: [
      'dist/',
      'node_modules/',
      'bench/.data/',
      'eslint.config.js',
      'bin/',
      'bench/floors/',
    ],
  },
  eslint.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    plugins: { blksync: { rules: { layers: layersRule, 'no-cycles': noCyclesRule } } },
    rules: {
      // node:test's test()/describe() return promises the runner itself awaits
      '@typescript-eslint/no-floating-promises': [
        'error',
        {
          allowForKnownSafeCalls: [
            { from: 'package', package: 'node:test', name: ['test', 'it', 'describe', 'suite'] },
          ],
        },
      ],
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
      'blksync/layers': 'error',
      'blksync/no-cycles': 'error',
    },
  },
);
