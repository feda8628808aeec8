// The load generator: the official socket.io-client in Node, one process, many connections.
// Usage: node loadgen.mjs URL AUTH_FILE
// AUTH_FILE holds a JSON list, one `auth` object per connection to open (100 in flight at a time).
// It prints one JSON line per phase; each stdin line {"expect": n} makes it count "msg" events until n arrived.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";

// The client is the one the tests pin (tests/package.json), so `./run test` has installed it.
const { io } = createRequire(new URL("../tests/package.json", import.meta.url))("socket.io-client");
const [url, authFile] = process.argv.slice(2);
const auths = JSON.parse(readFileSync(authFile, "utf8"));
const deflate = process.env.DEFLATE !== "0";
const say = (fact) => process.stdout.write(JSON.stringify(fact) + "\n");
const now = () => performance.timeOrigin + performance.now();

let received = 0, expected = Infinity, started = 0, latencies = [];
function onMessage(data) {
  received += 1;
  latencies.push(now() - data.sent * 1000);
  if (received === expected) {
    const seconds = (now() - started) / 1000;  // before sorting, which is not the server's time
    latencies.sort((a, b) => a - b);
    const at = (q) => latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * q))];
    say({ received, seconds, p50_ms: at(0.5), p99_ms: at(0.99) });
  }
}

const sockets = [];
let failed = 0;
const connectStarted = now();
for (let i = 0; i < auths.length; i += 100) {
  await Promise.all(auths.slice(i, i + 100).map((auth) => new Promise((resolve) => {
    const socket = io(url, { auth, transports: ["websocket"], reconnection: false, perMessageDeflate: deflate });
    socket.on("msg", onMessage);
    socket.once("connect", resolve);
    socket.once("connect_error", () => { failed += 1; resolve(); });
    sockets.push(socket);
  })));
}
say({ connected: sockets.length - failed, failed, seconds: (now() - connectStarted) / 1000 });

createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.expect !== undefined) {
    received = 0; latencies = []; expected = command.expect; started = now();
    say({ ready: true });
  } else if (command.close) {
    sockets.forEach((socket) => socket.close());
    process.exit(0);
  }
});
