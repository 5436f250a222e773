// The chat as a Node user writes it, for bench/run's peers figure.
//
//   node server.js ws|socketio|socketio-streams REDIS_URL
//
// Listens on 127.0.0.1 (a port the kernel picks) and prints "listening http 127.0.0.1:PORT".
// ws: the original simple-chat protocol over `ws` + ioredis pub/sub: a text frame
// {"name", "content"} is published on Redis and every instance sends {"time", "name", "content"}
// to each of its clients. socketio: Socket.IO 4, event "chat" with {name, content}, broadcast
// with io.emit through @socket.io/redis-adapter. socketio-streams: the same through
// @socket.io/redis-streams-adapter with connection state recovery (2 minutes).
"use strict";

const http = require("http");
const Redis = require("ioredis");

const [mode, redisUrl] = process.argv.slice(2);
if (!["ws", "socketio", "socketio-streams"].includes(mode) || !redisUrl) {
  console.error("usage: node server.js ws|socketio|socketio-streams REDIS_URL");
  process.exit(64);
}

const CHANNEL = "chat";

function stamp(msg) {
  return {
    time: new Date().toISOString(),
    name: String(msg && msg.name),
    content: String(msg && msg.content),
  };
}

const server = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/plain" });
  res.end("chat\n");
});

if (mode === "ws") {
  const { WebSocketServer, WebSocket } = require("ws");
  const pub = new Redis(redisUrl);
  const sub = new Redis(redisUrl);
  const wss = new WebSocketServer({ server, path: "/ws" });
  sub.subscribe(CHANNEL);
  sub.on("message", (_channel, text) => {
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(text);
    }
  });
  wss.on("connection", (ws) => {
    ws.on("message", (data) => {
      let msg;
      try {
        msg = JSON.parse(data);
      } catch {
        ws.send(JSON.stringify({ error: "not JSON" }));
        return;
      }
      pub.publish(CHANNEL, JSON.stringify(stamp(msg)));
    });
  });
} else {
  const { Server } = require("socket.io");
  const options = {};
  if (mode === "socketio") {
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pub = new Redis(redisUrl);
    options.adapter = createAdapter(pub, pub.duplicate());
  } else {
    const { createAdapter } = require("@socket.io/redis-streams-adapter");
    options.adapter = createAdapter(new Redis(redisUrl));
    options.connectionStateRecovery = { maxDisconnectionDuration: 2 * 60 * 1000 };
  }
  const io = new Server(server, options);
  io.on("connection", (socket) => {
    socket.on("chat", (msg) => io.emit("chat", stamp(msg)));
  });
}

// PORT: a fixed port, for a server restarted where its proxy expects it.
server.listen(Number(process.env.PORT) || 0, "127.0.0.1", () => {
  console.log(`listening http 127.0.0.1:${server.address().port}`);
});
