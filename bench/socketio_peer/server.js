// A small Socket.IO 4 server doing what dongne does in bench/fanout.py:
// clients join a question room; an answerer sends answers, each one is
// acknowledged and broadcast to the room with io.to(room).emit (JSON payload
// with the same fields as dongne's new_answer event).
//
// Usage: node [--expose-gc] server.js [--host 127.0.0.1] [--port 0]
// Logs "socketio listening: ws://HOST:PORT" on stderr once listening.
// GET /gc runs a full GC (when started with --expose-gc) and answers with
// process.memoryUsage(), so the bench measures live memory, not garbage.
"use strict";

const http = require("http");
const crypto = require("crypto");
const { Server } = require("socket.io");

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const host = arg("--host", "127.0.0.1");
const port = Number(arg("--port", "0"));

const httpServer = http.createServer((req, res) => {
  if (req.url === "/gc") {
    if (typeof global.gc === "function") {
      global.gc();
      global.gc();
    }
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ gc: typeof global.gc === "function", ...process.memoryUsage() }));
    return;
  }
  if (req.url === "/health") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ status: "ok", connections: io.engine.clientsCount }));
    return;
  }
  // Anything else that is not Socket.IO's own path.
  if (!req.url.startsWith("/socket.io/")) {
    res.writeHead(404);
    res.end();
  }
});

const io = new Server(httpServer, {
  // Same shape as dongne's client port: WebSocket only, no compression.
  transports: ["websocket"],
  perMessageDeflate: false,
  serveClient: false,
});

let answerCount = 0;

function newId(prefix) {
  return prefix + Date.now().toString(16).padStart(12, "0") + crypto.randomBytes(4).toString("hex");
}

io.on("connection", (socket) => {
  const user = socket.handshake.query.user || socket.id;

  socket.on("join", (questionId, ack) => {
    if (typeof questionId !== "string") return;
    socket.join(questionId);
    if (typeof ack === "function") ack({ question_id: questionId });
  });

  socket.on("answer", (data, ack) => {
    if (!data || typeof data.question_id !== "string" || typeof data.content !== "string") {
      if (typeof ack === "function") ack({ error: "bad_request" });
      return;
    }
    answerCount += 1;
    const answer = {
      answer_id: newId("a"),
      question_id: data.question_id,
      author_id: user,
      author_nick: user,
      content: data.content,
      created_at: Date.now(),
      state: "delivered",
      accepted: false,
    };
    // The reply first, then the broadcast, as dongne does.
    if (typeof ack === "function") ack({ answer });
    io.to(data.question_id).emit("new_answer", { question_id: data.question_id, answer });
  });
});

httpServer.listen({ host, port, backlog: 4096 }, () => {
  const addr = httpServer.address();
  process.stderr.write(`socketio listening: ws://${addr.address}:${addr.port}\n`);
});

function shutdown() {
  io.close();
  httpServer.close();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
