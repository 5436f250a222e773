//! `app`: command-line entry point of the chat server.
fn main() {}
