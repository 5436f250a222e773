//! The backend side: which backend gets a request, whether it is up, the connections to it and
//! one HTTP/1.1 exchange over such a connection.
//!
//! `balance` holds the [`balance::Pool`] of backends and picks one per request (lock-free);
//! `upstream` opens connections and keeps idle keep-alive ones per backend; `exchange` sends a
//! request head and body over one and parses the response head, for the proxy and for `health`,
//! whose checker tasks flip each backend's up/down state that `balance` reads. Nothing here
//! knows about clients, TLS or the proxy.

pub mod balance;
pub mod exchange;
pub mod health;
pub mod upstream;
