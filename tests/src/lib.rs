//! Harness for the end-to-end tests: starts real `redis-server`, `app` and `lb` processes on
//! ephemeral loopback ports and connects real clients to them.
