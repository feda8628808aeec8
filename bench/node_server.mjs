// The reference row of bench/fanout.py: Node's Socket.IO 4.x server with a JWT-verifying middleware, and the same
// POST /bench/emit route as bench/apps.py. Never deploy it: /bench/emit lets anyone emit.
// Usage: GATEWAY_JWT_SECRET=... node node_server.mjs PORT
import { createSecretKey } from "node:crypto";
import { createServer } from "node:http";
import jwt from "jsonwebtoken";
import { Server } from "socket.io";

const key = createSecretKey(Buffer.from(process.env.GATEWAY_JWT_SECRET, "utf8"));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const http = createServer((request, response) => {
  if (request.method !== "POST" || request.url !== "/bench/emit") {
    response.writeHead(404).end();
    return;
  }
  let body = "";
  request.on("data", (chunk) => { body += chunk; });
  request.on("end", async () => {
    const { kind, count, users, spacing = 0 } = JSON.parse(body);
    for (let n = 0; n < count; n++) {
      if (kind === "fanout") {
        io.emit("msg", { sent: Date.now() / 1000, text: "x".repeat(60) });
      } else if (kind === "targeted") {
        io.to(`user:user${n % users}`).emit("msg", { sent: Date.now() / 1000 });
      } else {  // latency: light load, one emit every 5 ms
        io.to(`user:user${Math.floor(Math.random() * users)}`).emit("msg", { sent: Date.now() / 1000 });
        await sleep(5);
      }
      for (let turn = 0; turn < spacing; turn++) {  // "spaced": let the event loop turn, as the Python route does
        await new Promise(setImmediate);
      }
    }
    response.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify({ emitted: count }));
  });
});

// Socket.IO's own defaults (per-message deflate off since 3.0); transports as the Python servers are run.
const io = new Server(http, { transports: ["websocket"] });
io.use((socket, next) => {
  try {
    const claims = jwt.verify(socket.handshake.auth.token, key, { algorithms: ["HS256"] });
    socket.data.userId = claims.sub;
    next();
  } catch (error) {
    next(new Error("invalid token"));
  }
});
io.on("connection", (socket) => socket.join(`user:${socket.data.userId}`));
http.listen(Number(process.argv[2]), "127.0.0.1");
