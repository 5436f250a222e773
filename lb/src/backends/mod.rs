//! The backend side: choosing a backend, checking its health, connecting and exchanging.

pub mod balance;
pub mod exchange;
pub mod health;
pub mod upstream;
