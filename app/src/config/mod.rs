//! Configuration of the chat server: `app.toml` and the flags → one validated [`Config`].
//!
//! Data flows one way: the optional file is read into `raw::RawConfig` (serde, unknown keys
//! rejected, every key optional), the command-line / environment [`Overrides`] replace the keys
//! they name, and `validate` turns the result into the typed [`Config`] the rest of the crate
//! reads. Every default is a named `DEFAULT_*` constant below; every error has `confkit`'s shape
//! `FILE: KEY: REASON`, naming where the value came from (the file, or the flag), the key (or,
//! for what the TOML parser rejects, the line, quoted), and what is wrong with it.

mod auth;
mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use auth::{
    AuthConfig, DEFAULT_LEEWAY, DEFAULT_MAX_CONNECTIONS_PER_USER, DEFAULT_REFRESH_BEFORE,
    DEFAULT_TOKEN_TIMEOUT, DEFAULT_TOKEN_URL, TokenConfig,
};
pub use confkit::ConfigError;
pub use raw::{Overrides, RawConfig};

use crate::history::HistoryConfig;
use crate::redis::server::RedisConfig;

/// Address the HTTP/WebSocket listener binds when neither the file nor `--listen` says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Redis channel the original simple-chat uses; keep it to share a Redis with it.
pub const DEFAULT_REDIS_CHANNEL: &str = "simple-chat";
/// Largest WebSocket frame (and message) a client may send, in bytes; larger closes with 1009.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024;
/// Longest `name`, in characters (Unicode scalar values).
pub const DEFAULT_MAX_NAME_CHARS: usize = 64;
/// Longest `content`, in characters (Unicode scalar values).
pub const DEFAULT_MAX_CONTENT_CHARS: usize = 4000;
/// Sustained frames per second one connection may send.
pub const DEFAULT_MESSAGES_PER_SECOND: u32 = 10;
/// Frames one connection may send in a burst above the sustained rate.
pub const DEFAULT_MESSAGES_BURST: u32 = 20;
/// Open WebSockets per instance; one more is refused with HTTP 503 before the upgrade.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Messages queued per client; a client whose queue is full is disconnected (close 1013).
pub const DEFAULT_CLIENT_QUEUE: usize = 256;
/// Time between SIGTERM (503 on `/healthz`, new WebSockets refused) and closing every open
/// WebSocket with 1001; long enough for a load balancer's health check to notice.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Default interval of the WebSocket pings that find unreachable clients.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
/// The shortest ping interval: a client gets one interval to answer.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);
/// Messages kept in each channel's history for clients that resume after a reconnect.
pub const DEFAULT_HISTORY_MESSAGES: usize = 10_000;
/// Age beyond which messages leave the history.
pub const DEFAULT_HISTORY_AGE: Duration = Duration::from_secs(600);
/// How long a client message id (`cid`) is remembered, so a retried send is published once.
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(600);
/// Rooms (besides the default room) one instance holds members of at once; a join of one more
/// is refused with HTTP 503.
pub const DEFAULT_MAX_ROOMS: usize = 1000;
/// How long an instance stays subscribed to a room after its last local member left, so that a
/// member coming straight back (a reload, a reconnect) finds it subscribed.
pub const DEFAULT_ROOM_LINGER: Duration = Duration::from_secs(5);
/// First delay before resubscribing after the Redis subscription is lost.
pub const DEFAULT_REDIS_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Cap of the doubling delay between resubscription attempts.
pub const DEFAULT_REDIS_RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often a room's presence changes are gathered into one frame per member.
pub const DEFAULT_PRESENCE_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest presence interval.
const MIN_PRESENCE_INTERVAL: Duration = Duration::from_millis(50);
/// How long after its last heartbeat a silent instance's members leave everyone's presence.
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_secs(15);

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the binary binds its listener (the library is handed a bound listener).
    pub listen: SocketAddr,
    /// Redis settings; `None` keeps every message in process (one instance).
    pub redis: Option<RedisConfig>,
    /// Per-connection and per-instance limits.
    pub limits: Limits,
    /// Normalised (`scheme://host[:port]`, lower case) extra origins allowed to connect.
    pub allowed_origins: Vec<String>,
    /// Per-client queue length.
    pub client_queue: usize,
    /// Drain time on shutdown before WebSockets are closed with 1001.
    pub shutdown_grace: Duration,
    /// Every client is pinged this often; one that has not answered by the next ping is
    /// disconnected.
    pub ping_interval: Duration,
    /// What each room's history keeps.
    pub history: HistoryConfig,
    /// How many rooms, and how long an empty one lingers.
    pub rooms: RoomsConfig,
    /// Who may connect: anyone (the original protocol) or holders of a valid token.
    pub auth: AuthConfig,
    /// Who is here: on or off, how often it is told, how long a silent instance counts.
    pub presence: PresenceConfig,
    /// The server API's listener and keys; `None`: no API.
    pub api: Option<ApiConfig>,
}

/// Presence (see `presence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceConfig {
    /// `presence = false` turns it off: nothing counted, no frame sent.
    pub enabled: bool,
    /// Changes are gathered and sent once per interval.
    pub interval: Duration,
    /// An instance that has not heartbeaten for this long is gone, its members with it.
    pub ttl: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            enabled: true,
            interval: DEFAULT_PRESENCE_INTERVAL,
            ttl: DEFAULT_PRESENCE_TTL,
        }
    }
}

/// The server API (see `api`): where it listens and the file of keys it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Its own listener, apart from the public one.
    pub listen: SocketAddr,
    /// One API key per line (`#` comments and blank lines ignored), read again on SIGHUP.
    pub keys_file: std::path::PathBuf,
}

/// Limits of the rooms one instance holds (see `hub::rooms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomsConfig {
    /// Rooms with local members at once, besides the default room (0: the default room only).
    pub max_rooms: usize,
    /// How long a room without local members stays subscribed before it is dropped.
    pub linger: Duration,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            max_rooms: DEFAULT_MAX_ROOMS,
            linger: DEFAULT_ROOM_LINGER,
        }
    }
}

/// Limits on what one client may send and how many clients one instance takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Frame and message size limit in bytes (close 1009 above it).
    pub max_frame_bytes: usize,
    /// `name` length limit in characters.
    pub max_name_chars: usize,
    /// `content` length limit in characters.
    pub max_content_chars: usize,
    /// Sustained frames per second per connection.
    pub messages_per_second: u32,
    /// Burst of frames per connection.
    pub messages_burst: u32,
    /// Open WebSockets per instance.
    pub max_connections: usize,
}

/// Reads `path` (if given), applies `overrides` and validates the result.
pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
    let (raw, origin) = match path {
        Some(path) => {
            let text = confkit::read(path)?;
            let origin = path.display().to_string();
            (RawConfig::parse(&text, &origin)?, origin)
        }
        None => (RawConfig::default(), "defaults".to_owned()),
    };
    raw.validate_with(&origin, overrides)
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors (a file name, usually).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        RawConfig::parse(text, origin)?.validate(origin)
    }
}

/// Most messages a channel's history may keep: a resuming client is sent all it missed at once.
pub const MAX_HISTORY_MESSAGES: usize = 1_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_key(result: Result<Config, ConfigError>) -> (String, String) {
        match result {
            Err(ConfigError::Invalid { file, key, .. }) => (file, key),
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::from_toml("", "app.toml").unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(config.redis.is_none());
        assert_eq!(config.limits.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES);
        assert_eq!(config.client_queue, DEFAULT_CLIENT_QUEUE);
        assert_eq!(config.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(config.ping_interval, DEFAULT_PING_INTERVAL);
        assert!(config.allowed_origins.is_empty());
    }

    #[test]
    fn a_ping_interval_too_short_to_answer_is_refused() {
        let err = Config::from_toml("ping_interval = \"50ms\"\n", "a.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "a.toml: ping_interval: 50ms is too small; the minimum is 100ms"
        );
        let config = Config::from_toml("ping_interval = \"2s\"\n", "a.toml").unwrap();
        assert_eq!(config.ping_interval, Duration::from_secs(2));
    }

    #[test]
    fn the_example_config_is_valid_and_names_every_key() {
        let text = include_str!("../../../config/app.toml");
        let config = Config::from_toml(text, "config/app.toml").unwrap();
        assert_eq!(config.redis.unwrap().channel, DEFAULT_REDIS_CHANNEL);
        let keys = [
            "listen",
            "redis_url",
            "redis_channel",
            "redis_ca_file",
            "redis_reconnect_min",
            "redis_reconnect_max",
            "allowed_origins",
            "max_frame_bytes",
            "max_name_chars",
            "max_content_chars",
            "messages_per_second",
            "messages_burst",
            "max_connections",
            "client_queue",
            "shutdown_grace",
            "ping_interval",
            "history_messages",
            "history_age",
            "dedupe_window",
            "max_rooms",
            "room_linger",
            "auth",
            "presence",
            "presence_interval",
            "presence_ttl",
            "api_listen",
            "api_keys_file",
        ];
        for key in keys {
            assert!(
                text.contains(&format!("{key} =")) || text.contains(&format!("[{key}]")),
                "config/app.toml lacks {key}"
            );
        }
        // The list above is every key there is: the parser names them all for an unknown one.
        let err = Config::from_toml("no_such_key = 1", "x")
            .unwrap_err()
            .to_string();
        let expected = err.split("expected one of").nth(1).unwrap_or_default();
        let mut known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        known.sort_unstable();
        let mut listed = keys.to_vec();
        listed.sort_unstable();
        assert_eq!(known, listed, "{err}");
    }

    #[test]
    fn every_key_parses() {
        let config = Config::from_toml(
            r#"
            listen = "0.0.0.0:80"
            redis_url = "redis://:secret@10.0.0.5:6380/2"
            redis_channel = "chat"
            redis_reconnect_min = "50ms"
            redis_reconnect_max = "2s"
            allowed_origins = ["https://Chat.Example.com/"]
            max_frame_bytes = 1000
            max_name_chars = 10
            max_content_chars = 100
            messages_per_second = 5
            messages_burst = 7
            max_connections = 3
            client_queue = 4
            shutdown_grace = "250ms"
            "#,
            "app.toml",
        )
        .unwrap();
        assert_eq!(config.listen, "0.0.0.0:80".parse().unwrap());
        let redis = config.redis.unwrap();
        assert_eq!(redis.display, "redis://10.0.0.5:6380");
        assert!(!format!("{redis:?}").contains("secret"));
        assert_eq!(redis.channel, "chat");
        assert_eq!(redis.reconnect_min, Duration::from_millis(50));
        assert_eq!(config.allowed_origins, vec!["https://chat.example.com"]);
        assert_eq!(
            config.limits,
            Limits {
                max_frame_bytes: 1000,
                max_name_chars: 10,
                max_content_chars: 100,
                messages_per_second: 5,
                messages_burst: 7,
                max_connections: 3,
            }
        );
        assert_eq!(config.client_queue, 4);
        assert_eq!(config.shutdown_grace, Duration::from_millis(250));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = Config::from_toml("listen = \"127.0.0.1:1\"\nmax_conections = 5\n", "a.toml")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("a.toml: line 2 `max_conections = 5`: "),
            "{text}"
        );
        assert!(text.contains("unknown field"), "{text}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::from_toml("client_queue = \"many\"\n", "a.toml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("a.toml: line 1 `client_queue = \"many\"`: "),
            "{err}"
        );
        let err = Config::from_toml("shutdown_grace = \"soon\"\n", "a.toml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("a.toml: line 1 `shutdown_grace = \"soon\"`: "),
            "{err}"
        );
    }

    #[test]
    fn an_error_inside_a_multi_line_array_quotes_its_line() {
        let text = "redis_url = \"redis://h\"\nredis_channel = \"caf\u{e9} \u{2615}\"\n\
                    allowed_origins = [\n    \"https://a.example\",\n    5,\n]\n";
        let err = Config::from_toml(text, "a.toml").unwrap_err().to_string();
        assert!(err.starts_with("a.toml: line 5 `5,`: "), "{err}");
        assert!(err.contains("invalid type"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("listen = \"localhost\"", "listen"),
            ("redis_url = \"http://x\"", "redis_url"),
            ("redis_url = \"redis+unix:///tmp/r.sock\"", "redis_url"),
            ("redis_channel = \"c\"", "redis_channel"),
            ("redis_reconnect_min = \"1s\"", "redis_reconnect_min"),
            ("redis_reconnect_max = \"1s\"", "redis_reconnect_max"),
            (
                "redis_url = \"redis://h\"\nredis_ca_file = \"/nonexistent\"",
                "redis_ca_file",
            ),
            (
                "redis_url = \"rediss://h\"\nredis_ca_file = \"/nonexistent\"",
                "redis_ca_file",
            ),
            (
                "redis_url = \"redis://h\"\nredis_reconnect_max = \"1ms\"",
                "redis_reconnect_max",
            ),
            (
                "allowed_origins = [\"chat.example.com\"]",
                "allowed_origins",
            ),
            ("allowed_origins = [\"https://x/path\"]", "allowed_origins"),
            ("max_frame_bytes = 10", "max_frame_bytes"),
            ("messages_per_second = 0", "messages_per_second"),
            ("max_connections = 0", "max_connections"),
            ("client_queue = 0", "client_queue"),
        ];
        for (text, expected) in cases {
            let (origin, key) = invalid_key(Config::from_toml(text, "app.toml"));
            assert_eq!(
                (origin.as_str(), key.as_str()),
                ("app.toml", expected),
                "{text}"
            );
        }
    }

    #[test]
    fn overrides_win_and_are_named_in_errors() {
        let raw = RawConfig::parse("redis_url = \"redis://file-host\"", "app.toml").unwrap();
        let config = raw
            .validate_with(
                "app.toml",
                Overrides {
                    listen: Some("127.0.0.1:0".parse().unwrap()),
                    redis_url: Some("redis://flag-host:7000".to_owned()),
                },
            )
            .unwrap();
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.redis.unwrap().display, "redis://flag-host:7000");

        let raw = RawConfig::parse("", "app.toml").unwrap();
        let (origin, key) = invalid_key(raw.validate_with(
            "app.toml",
            Overrides {
                listen: None,
                redis_url: Some("nonsense".to_owned()),
            },
        ));
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("--redis / REDIS_URL", "redis_url")
        );
    }

    #[test]
    fn empty_redis_url_means_in_process() {
        let raw = RawConfig::parse("", "app.toml").unwrap();
        let config = raw
            .validate_with(
                "app.toml",
                Overrides {
                    listen: None,
                    redis_url: Some(String::new()),
                },
            )
            .unwrap();
        assert!(config.redis.is_none());
    }

    #[test]
    fn rediss_url_with_password_is_accepted() {
        let config =
            Config::from_toml("redis_url = \"rediss://:tok%40en@cache.example:6380\"", "a")
                .unwrap();
        assert_eq!(config.redis.unwrap().display, "rediss://cache.example:6380");
    }

    #[test]
    fn history_keys_have_defaults_and_bounds() {
        let config = Config::from_toml("", "app.toml").unwrap();
        assert_eq!(
            config.history,
            HistoryConfig {
                messages: DEFAULT_HISTORY_MESSAGES,
                max_age: DEFAULT_HISTORY_AGE,
                dedupe_window: DEFAULT_DEDUPE_WINDOW,
            }
        );
        let config = Config::from_toml(
            "history_messages = 5\nhistory_age = \"2s\"\ndedupe_window = \"1m\"",
            "app.toml",
        )
        .unwrap();
        assert_eq!(config.history.messages, 5);
        assert_eq!(config.history.max_age, Duration::from_secs(2));
        assert_eq!(config.history.dedupe_window, Duration::from_secs(60));
        for (text, key) in [
            ("history_messages = 0", "history_messages"),
            ("history_messages = 1000001", "history_messages"),
            ("history_age = \"500ms\"", "history_age"),
            ("dedupe_window = \"0s\"", "dedupe_window"),
        ] {
            let (origin, bad) = invalid_key(Config::from_toml(text, "app.toml"));
            assert_eq!((origin.as_str(), bad.as_str()), ("app.toml", key), "{text}");
        }
        let err = Config::from_toml("history_age = \"10ms\"", "app.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "app.toml: history_age: 10ms is too small; the minimum is 1s"
        );
    }

    #[test]
    fn presence_and_api_keys_have_defaults_and_checks() {
        let config = Config::from_toml("", "app.toml").unwrap();
        assert_eq!(config.presence, PresenceConfig::default());
        assert!(config.api.is_none());
        let config = Config::from_toml(
            "presence = false\npresence_interval = \"200ms\"\npresence_ttl = \"3s\"\n\
             api_listen = \"127.0.0.1:9200\"\napi_keys_file = \"keys\"",
            "conf/app.toml",
        )
        .unwrap();
        assert_eq!(
            config.presence,
            PresenceConfig {
                enabled: false,
                interval: Duration::from_millis(200),
                ttl: Duration::from_secs(3),
            }
        );
        let api = config.api.unwrap();
        assert_eq!(api.listen, "127.0.0.1:9200".parse().unwrap());
        assert_eq!(api.keys_file, Path::new("keys"));
        for (text, key) in [
            ("presence_interval = \"10ms\"", "presence_interval"),
            ("presence_ttl = \"1s\"", "presence_ttl"),
            ("api_listen = \"127.0.0.1:9200\"", "api_keys_file"),
            ("api_keys_file = \"k\"", "api_listen"),
            (
                "api_listen = \"nowhere\"\napi_keys_file = \"k\"",
                "api_listen",
            ),
        ] {
            let (origin, bad) = invalid_key(Config::from_toml(text, "app.toml"));
            assert_eq!((origin.as_str(), bad.as_str()), ("app.toml", key), "{text}");
        }
    }

    #[test]
    fn room_keys_have_defaults() {
        let config = Config::from_toml("", "app.toml").unwrap();
        assert_eq!(config.rooms, RoomsConfig::default());
        let config =
            Config::from_toml("max_rooms = 0\nroom_linger = \"250ms\"", "app.toml").unwrap();
        assert_eq!(
            config.rooms,
            RoomsConfig {
                max_rooms: 0,
                linger: Duration::from_millis(250),
            }
        );
        let err = Config::from_toml("max_rooms = -1", "app.toml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("app.toml: line 1 `max_rooms = -1`: "),
            "{err}"
        );
    }
}
