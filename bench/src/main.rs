//! `bench`: load generator (fan-out, echo, idle) and neutral backend for side-by-side figures.
fn main() {}
