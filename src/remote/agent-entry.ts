/** esbuild's entry for the agent bundle (dist/agent.cjs): `module.exports.main`. */

export { main } from './agent/run.js';
