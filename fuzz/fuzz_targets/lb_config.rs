//! Arbitrary text as `lb.toml`, through `lb::Config::parse` (the TOML parser, then every key's
//! validation and the error messages that quote the offending line). Checks that it never
//! panics, that an error renders, and that an accepted configuration has what `lb` needs to
//! start: a certificate, at least one backend, distinct backend addresses and names, and
//! distinct listener addresses. Backend addresses may be DNS names, so the target runs in a
//! network namespace of its own (`isolate_network`): a name resolves only from /etc/hosts.

#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use scaleout_fuzz::isolate_network;

fuzz_target!(
    init: isolate_network(),
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        match lb::Config::parse(text, "lb.toml", Path::new("/etc/lb"), &Default::default()) {
            Ok(config) => {
                assert!(!config.certificates.is_empty());
                assert!(!config.backends.is_empty());
                let addrs: HashSet<_> = config.backends.iter().map(|b| b.addr).collect();
                let names: HashSet<_> = config.backends.iter().map(|b| &b.name).collect();
                assert_eq!(addrs.len(), config.backends.len());
                assert_eq!(names.len(), config.backends.len());
                let listen = &config.listen;
                let mut bound = vec![listen.https];
                bound.extend(listen.redirect);
                bound.extend(listen.admin);
                let fixed: Vec<_> = bound.iter().filter(|a| a.port() != 0).collect();
                let distinct: HashSet<_> = fixed.iter().collect();
                assert_eq!(distinct.len(), fixed.len(), "{listen:?}");
            }
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains("lb.toml"), "{message}");
            }
        }
    }
);
