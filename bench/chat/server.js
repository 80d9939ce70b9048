// socket.io 4 chat server for bench/chat.sh and bench/chat-cluster.sh: join a room, broadcast
// to it. WebSocket transport only (what the load client speaks), no compression. The default
// in-memory adapter; with REDIS_URL set, the Redis adapter, so that several processes share
// rooms (socket.io's documented way to run more than one server).
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 7620);
const io = new Server({
  transports: ["websocket"],
  perMessageDeflate: false,
  maxHttpBufferSize: 1e6,
});

async function useRedis(url) {
  const { createClient } = require("redis");
  const { createAdapter } = require("@socket.io/redis-adapter");
  const pub = createClient({ url });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
}

io.on("connection", (socket) => {
  socket.on("join", (room) => {
    socket.join(room);
    socket.emit("joined", { room });
  });
  socket.on("send", (msg) => {
    io.to(msg.room).emit("msg", { room: msg.room, user: socket.id, text: msg.text });
  });
});

// Listens once the adapter is in place, so no connection joins a room before it.
(process.env.REDIS_URL ? useRedis(process.env.REDIS_URL) : Promise.resolve()).then(() => {
  io.listen(port);
  const version = JSON.parse(
    require("fs").readFileSync(require("path").join(__dirname, "node_modules/socket.io/package.json")),
  ).version;
  const adapter = process.env.REDIS_URL ? "redis adapter" : "in-memory adapter";
  console.log(`socket.io ${version} (${adapter}) on 127.0.0.1:${port}`);
});
