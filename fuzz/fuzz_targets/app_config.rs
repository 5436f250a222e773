//! Arbitrary text as `app.toml`, through `app::config::Config::from_toml` (the TOML parser,
//! then every key's validation, the Redis URL's parsing, and the error messages that quote the
//! offending line). Checks that it never panics, that an error renders naming the file, and
//! that an accepted configuration keeps its limits positive and its reconnect delays ordered.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match app::config::Config::from_toml(text, "app.toml") {
        Ok(config) => {
            let limits = &config.limits;
            assert!(
                limits.max_name_chars > 0 && limits.max_content_chars > 0,
                "{limits:?}"
            );
            if let Some(redis) = &config.redis {
                assert!(redis.reconnect_min <= redis.reconnect_max, "{redis:?}");
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("app.toml"), "{message}");
        }
    }
});
