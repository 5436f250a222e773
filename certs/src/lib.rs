//! Certificates for scaleout: generate a local CA and server certificates, and load PEM files
//! (separate or HAProxy-style combined) into rustls types. This crate never touches the network.
