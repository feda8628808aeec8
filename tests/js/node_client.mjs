// The official socket.io-client in Node, driven by tests/test_js_clients.py through stdin and stdout.
// Usage: node node_client.mjs URL TOKEN [websocket|polling|default]
// It prints one JSON line per thing that happens; each stdin line is a command:
//   {"token": "..."}   connect again with this token (after a connect_error)
//   {"refresh": "..."} emit refresh with this token and print the acknowledgement
//   {"close": true}    disconnect and exit
import { io } from "socket.io-client";
import { createInterface } from "node:readline";

const [url, token, transport] = process.argv.slice(2);
const say = (fact) => process.stdout.write(JSON.stringify(fact) + "\n");

const socket = io(url, {
  auth: { token },
  transports: { websocket: ["websocket"], polling: ["polling"] }[transport] ?? ["polling", "websocket"],
  reconnectionDelay: 100,
  reconnectionDelayMax: 500,
});

socket.on("connect", () => say({ connected: socket.id, recovered: socket.recovered }));
socket.io.on("open", () => socket.io.engine.on("upgrade", (t) => say({ upgraded: t.name })));
socket.on("connect_error", (err) => say({ connect_error: err.message, data: err.data ?? null }));
socket.on("disconnect", (reason) => say({ disconnected: reason }));
socket.onAny((event, ...args) => say({ event, args }));

createInterface({ input: process.stdin }).on("line", async (line) => {
  const command = JSON.parse(line);
  if (command.token) {
    socket.auth.token = command.token;
    socket.connect();
  } else if (command.refresh) {
    say({ ack: await socket.timeout(5000).emitWithAck("refresh", { token: command.refresh }) });
  } else if (command.close) {
    socket.close();
    process.exit(0);
  }
});
