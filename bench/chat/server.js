// socket.io 4 chat server for bench/chat.sh: join a room, broadcast to it. WebSocket
// transport only (what the load client speaks), no compression, default in-memory adapter.
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 7620);
const io = new Server(port, {
  transports: ["websocket"],
  perMessageDeflate: false,
  maxHttpBufferSize: 1e6,
});

io.on("connection", (socket) => {
  socket.on("join", (room) => {
    socket.join(room);
    socket.emit("joined", { room });
  });
  socket.on("send", (msg) => {
    io.to(msg.room).emit("msg", { room: msg.room, user: socket.id, text: msg.text });
  });
});

const version = JSON.parse(
  require("fs").readFileSync(require("path").join(__dirname, "node_modules/socket.io/package.json")),
).version;
console.log(`socket.io ${version} on 127.0.0.1:${port}`);
