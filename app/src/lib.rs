//! The scaleout chat server: serves the chat page and WebSocket, and shares every message
//! through Redis pub/sub (or an in-process broker when no Redis is configured).
