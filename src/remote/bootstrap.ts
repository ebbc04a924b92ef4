/**
 * Getting the agent onto the remote without installing anything: ssh runs
 * `node -e <BOOTSTRAP>`, and the bootstrap reads the agent from stdin,
 *
 *   +-----------+----------------------------------+-------------------------
 *   | n (u32 BE)| agent bundle, raw deflate (n B)  | protocol frames ...
 *   +-----------+----------------------------------+-------------------------
 *
 * inflates it, runs it as a CommonJS module and hands it the bytes it read past the bundle,
 * so stdin and stdout then carry the protocol. Nothing is written to the remote's disk.
 *
 * The bootstrap hands the agent the bundle's own bytes as well (length prefix included), so
 * an agent asked for a direct copy (`--direct`) can start the agent on the other host the
 * same way. This file holds only constants: it is part of the agent bundle itself, and
 * agent-payload.ts (which loads the bundle) is not.
 */

/** Exit status of the bootstrap when the remote node is older than the agent needs. */
export const EXIT_NODE_TOO_OLD = 96;
/** Oldest Node.js major the agent runs on. */
export const MIN_REMOTE_NODE = 18;

/** Small, and free of single quotes so it survives the remote shell's quoting unchanged. */
export const BOOTSTRAP =
  `var v=+process.versions.node.split(".")[0];if(v<${MIN_REMOTE_NODE}){process.stderr.write(` +
  `"blksync: remote node "+process.version+" is too old; blksync needs node >= ${MIN_REMOTE_NODE}\\n");` +
  `process.exit(${EXIT_NODE_TOO_OLD})}var b=Buffer.alloc(0);process.stdin.on("data",function f(d){` +
  `b=Buffer.concat([b,d]);if(b.length<4)return;var n=b.readUInt32BE(0);if(b.length<4+n)return;` +
  `process.stdin.removeListener("data",f);process.stdin.pause();var m={exports:{}};` +
  `new Function("require","module","exports",require("zlib").inflateRawSync(b.subarray(4,4+n))` +
  `.toString())(require,m,m.exports);m.exports.main(b.subarray(4+n),b.subarray(0,4+n))})`;
