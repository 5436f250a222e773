//! `lb`: command-line entry point of the load balancer.
fn main() {}
