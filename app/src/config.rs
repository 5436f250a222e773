//! Configuration of the chat server.
//!
//! Data flows one way: the optional `app.toml` is read into [`RawConfig`] (serde, unknown keys
//! rejected, every key optional), the command-line / environment [`Overrides`] replace the keys
//! they name, and [`RawConfig::validate`] turns the result into the typed [`Config`] the rest of
//! the crate reads. Every default is a named `DEFAULT_*` constant below; every error names where
//! the value came from (the file, or the flag), the key (or, for what the TOML parser rejects,
//! the line, quoted), and what is wrong with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use confkit::Checker;
pub use confkit::ConfigError;
use serde::Deserialize;

use crate::cluster::Seeds;

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

/// `app.toml` as written: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `ip:port` to listen on.
    pub listen: Option<String>,
    /// `redis://` or `rediss://` URL; absent means the in-process broker (single instance).
    pub redis_url: Option<String>,
    /// Pub/sub channel shared by every instance.
    pub redis_channel: Option<String>,
    /// PEM file of the CA that signed a `rediss://` server's certificate (default: system roots).
    pub redis_ca_file: Option<PathBuf>,
    /// First resubscription delay.
    #[serde(default, with = "humantime_serde")]
    pub redis_reconnect_min: Option<Duration>,
    /// Resubscription delay cap.
    #[serde(default, with = "humantime_serde")]
    pub redis_reconnect_max: Option<Duration>,
    /// Origins (`scheme://host[:port]`) allowed to open a WebSocket besides the page's own host.
    pub allowed_origins: Option<Vec<String>>,
    /// Frame and message size limit in bytes.
    pub max_frame_bytes: Option<usize>,
    /// `name` length limit in characters.
    pub max_name_chars: Option<usize>,
    /// `content` length limit in characters.
    pub max_content_chars: Option<usize>,
    /// Sustained frames per second per connection.
    pub messages_per_second: Option<u32>,
    /// Burst of frames per connection.
    pub messages_burst: Option<u32>,
    /// Open WebSockets per instance.
    pub max_connections: Option<usize>,
    /// Per-client queue length.
    pub client_queue: Option<usize>,
    /// Drain time before open WebSockets are closed on shutdown.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    /// Interval of the WebSocket pings each client must answer.
    #[serde(default, with = "humantime_serde")]
    pub ping_interval: Option<Duration>,
    /// Messages kept per channel for resuming clients.
    pub history_messages: Option<usize>,
    /// Age beyond which messages leave the history.
    #[serde(default, with = "humantime_serde")]
    pub history_age: Option<Duration>,
    /// How long a client message id is remembered.
    #[serde(default, with = "humantime_serde")]
    pub dedupe_window: Option<Duration>,
    /// Rooms with local members, besides the default room.
    pub max_rooms: Option<usize>,
    /// How long a room stays subscribed after its last local member left.
    #[serde(default, with = "humantime_serde")]
    pub room_linger: Option<Duration>,
}

/// Values given on the command line or in the environment; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen ADDR`.
    pub listen: Option<SocketAddr>,
    /// `--redis URL` or `REDIS_URL`; an empty string counts as absent.
    pub redis_url: Option<String>,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the binary binds its listener (the library is handed a bound listener).
    pub listen: SocketAddr,
    /// Redis settings; `None` selects the in-process broker.
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
}

/// Limits of the rooms one instance holds (see `rooms`).
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

/// How much of a channel's history is kept for resuming clients, and how long a client
/// message id is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Messages kept (approximately, with Redis: trimming works in whole stream nodes).
    pub messages: usize,
    /// Age beyond which messages are trimmed.
    pub max_age: Duration,
    /// How long a `cid` is remembered for deduplication.
    pub dedupe_window: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            messages: DEFAULT_HISTORY_MESSAGES,
            max_age: DEFAULT_HISTORY_AGE,
            dedupe_window: DEFAULT_DEDUPE_WINDOW,
        }
    }
}

/// How to reach Redis and what to do when it goes away.
#[derive(Clone)]
pub struct RedisConfig {
    /// The server or cluster, from the URL (and CA file), ready to connect; it holds the
    /// password.
    pub server: RedisServer,
    /// Host and port only, for logs (never the password).
    pub display: String,
    /// Pub/sub channel.
    pub channel: String,
    /// First resubscription delay.
    pub reconnect_min: Duration,
    /// Resubscription delay cap.
    pub reconnect_max: Duration,
}

/// One Redis server, or the seed nodes of a cluster.
#[derive(Clone)]
pub enum RedisServer {
    /// `redis://` or `rediss://`.
    Single(redis::Client),
    /// `redis+cluster://` or `rediss+cluster://`.
    Cluster(Seeds),
}

impl RedisServer {
    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisServer::Cluster(_))
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("server", &self.display)
            .field("channel", &self.channel)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .finish_non_exhaustive()
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

/// Where each value came from, so an error can point at the file or at the flag.
struct Origin<'a> {
    file: &'a str,
    redis_from_cli: bool,
    listen_from_cli: bool,
}

impl<'a> Origin<'a> {
    /// The checks of `key`, naming the file or the flag it came from.
    fn of(&self, key: &str) -> Checker<'a> {
        Checker::new(match key {
            "redis_url" if self.redis_from_cli => "--redis / REDIS_URL",
            "listen" if self.listen_from_cli => "--listen",
            _ => self.file,
        })
    }

    fn invalid(&self, key: &str, reason: impl std::fmt::Display) -> ConfigError {
        self.of(key).err(key, reason)
    }

    /// The value of a numeric key, or its default; below `min` is an error naming the key.
    fn at_least<T>(&self, key: &str, value: Option<T>, default: T, min: T) -> Result<T, ConfigError>
    where
        T: PartialOrd + std::fmt::Display + Copy,
    {
        self.of(key).at_least(key, value, default, min)
    }

    /// The value of a duration key, or its default; below `min` is an error naming the key.
    fn duration_at_least(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
        min: Duration,
    ) -> Result<Duration, ConfigError> {
        self.of(key).duration_at_least(key, value, default, min)
    }
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

impl RawConfig {
    /// Parses TOML text; errors carry the line the parser points at, quoted.
    pub fn parse(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
        confkit::parse(text, origin)
    }

    /// Validates the keys as written; `origin` names the file in errors.
    pub fn validate(self, origin: &str) -> Result<Config, ConfigError> {
        self.validate_with(origin, Overrides::default())
    }

    fn validate_with(mut self, file: &str, overrides: Overrides) -> Result<Config, ConfigError> {
        let redis_override = overrides.redis_url.filter(|u| !u.is_empty());
        let origin = Origin {
            file,
            redis_from_cli: redis_override.is_some(),
            listen_from_cli: overrides.listen.is_some(),
        };
        if redis_override.is_some() {
            self.redis_url = redis_override;
        }

        let listen = match overrides.listen {
            Some(addr) => addr,
            None => {
                let text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
                origin.of("listen").addr("listen", text)?
            }
        };

        let limits = Limits {
            max_frame_bytes: origin.at_least(
                "max_frame_bytes",
                self.max_frame_bytes,
                DEFAULT_MAX_FRAME_BYTES,
                64,
            )?,
            max_name_chars: origin.at_least(
                "max_name_chars",
                self.max_name_chars,
                DEFAULT_MAX_NAME_CHARS,
                1,
            )?,
            max_content_chars: origin.at_least(
                "max_content_chars",
                self.max_content_chars,
                DEFAULT_MAX_CONTENT_CHARS,
                1,
            )?,
            messages_per_second: origin.at_least(
                "messages_per_second",
                self.messages_per_second,
                DEFAULT_MESSAGES_PER_SECOND,
                1,
            )?,
            messages_burst: origin.at_least(
                "messages_burst",
                self.messages_burst,
                DEFAULT_MESSAGES_BURST,
                1,
            )?,
            max_connections: origin.at_least(
                "max_connections",
                self.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                1,
            )?,
        };
        let client_queue =
            origin.at_least("client_queue", self.client_queue, DEFAULT_CLIENT_QUEUE, 1)?;

        let allowed_origins = self
            .allowed_origins
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|o| {
                crate::origin::normalise(o).ok_or_else(|| {
                    origin.invalid(
                        "allowed_origins",
                        format!(
                            "`{o}` is not an origin; write scheme://host[:port] with no path, \
                             e.g. \"https://chat.example.com\""
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let redis = self.redis(&origin)?;
        let history = self.history(&origin)?;
        let rooms = RoomsConfig {
            max_rooms: self.max_rooms.unwrap_or(DEFAULT_MAX_ROOMS),
            linger: self.room_linger.unwrap_or(DEFAULT_ROOM_LINGER),
        };

        Ok(Config {
            listen,
            redis,
            limits,
            allowed_origins,
            client_queue,
            shutdown_grace: self.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            ping_interval: origin.duration_at_least(
                "ping_interval",
                self.ping_interval,
                DEFAULT_PING_INTERVAL,
                MIN_PING_INTERVAL,
            )?,
            history,
            rooms,
        })
    }

    fn history(&self, origin: &Origin<'_>) -> Result<HistoryConfig, ConfigError> {
        let messages = origin.at_least(
            "history_messages",
            self.history_messages,
            DEFAULT_HISTORY_MESSAGES,
            1,
        )?;
        if messages > MAX_HISTORY_MESSAGES {
            return Err(origin.invalid(
                "history_messages",
                format!("{messages} is too large; the maximum is {MAX_HISTORY_MESSAGES}"),
            ));
        }
        let second = Duration::from_secs(1);
        let max_age = origin.duration_at_least(
            "history_age",
            self.history_age,
            DEFAULT_HISTORY_AGE,
            second,
        )?;
        let dedupe_window = origin.duration_at_least(
            "dedupe_window",
            self.dedupe_window,
            DEFAULT_DEDUPE_WINDOW,
            second,
        )?;
        Ok(HistoryConfig {
            messages,
            max_age,
            dedupe_window,
        })
    }

    fn redis(&self, origin: &Origin<'_>) -> Result<Option<RedisConfig>, ConfigError> {
        let Some(url) = self.redis_url.as_deref().filter(|u| !u.is_empty()) else {
            for (key, set) in [
                ("redis_channel", self.redis_channel.is_some()),
                ("redis_ca_file", self.redis_ca_file.is_some()),
                ("redis_reconnect_min", self.redis_reconnect_min.is_some()),
                ("redis_reconnect_max", self.redis_reconnect_max.is_some()),
            ] {
                if set {
                    return Err(origin.invalid(
                        key,
                        "is set but redis_url is not; set redis_url (or --redis / REDIS_URL)",
                    ));
                }
            }
            return Ok(None);
        };
        let ca = self.redis_ca_file.as_deref();
        let (server, display) = if Seeds::is_cluster_url(url) {
            Self::redis_cluster(url, ca, origin)?
        } else {
            Self::redis_single(url, ca, origin)?
        };
        let channel = self
            .redis_channel
            .clone()
            .unwrap_or_else(|| DEFAULT_REDIS_CHANNEL.to_owned());
        if channel.is_empty() {
            return Err(origin.invalid("redis_channel", "must not be empty"));
        }
        let reconnect_min = self
            .redis_reconnect_min
            .unwrap_or(DEFAULT_REDIS_RECONNECT_MIN);
        let reconnect_max = self
            .redis_reconnect_max
            .unwrap_or(DEFAULT_REDIS_RECONNECT_MAX);
        if reconnect_min.is_zero() {
            return Err(origin.invalid("redis_reconnect_min", "must be more than 0s"));
        }
        if reconnect_max < reconnect_min {
            return Err(origin.invalid(
                "redis_reconnect_max",
                format!(
                    "{} is less than redis_reconnect_min ({})",
                    confkit::show(reconnect_max),
                    confkit::show(reconnect_min)
                ),
            ));
        }
        if server.is_cluster() && channel.contains(['{', '}']) {
            return Err(origin.invalid(
                "redis_channel",
                "must not contain { or } with a cluster: the channel is the hash tag that keeps \
                 each room's channel and history on one shard",
            ));
        }
        Ok(Some(RedisConfig {
            server,
            display,
            channel,
            reconnect_min,
            reconnect_max,
        }))
    }

    /// One server: `redis://` or `rediss://`, with the CA for TLS.
    fn redis_single(
        url: &str,
        ca: Option<&Path>,
        origin: &Origin<'_>,
    ) -> Result<(RedisServer, String), ConfigError> {
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
            origin.invalid(
                "redis_url",
                format!(
                    "not a usable Redis URL ({}); expected redis://[:password@]host[:port][/db], \
                     rediss://…, or redis+cluster://host:port[,host:port…] for a cluster",
                    e.detail().unwrap_or("invalid URL")
                ),
            )
        })?;
        let (display, tls) = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => (format!("redis://{host}:{port}"), false),
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                (format!("rediss://{host}:{port}"), true)
            }
            _ => {
                return Err(origin.invalid(
                    "redis_url",
                    "only redis://, rediss://, redis+cluster:// and rediss+cluster:// URLs are supported",
                ));
            }
        };
        let client = match ca {
            Some(path) => {
                let pem = read_ca(path, tls, "rediss://", origin)?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(|e| {
                    origin.invalid(
                        "redis_ca_file",
                        format!("{} is not a usable PEM CA certificate: {e}", path.display()),
                    )
                })?
            }
            None => redis::Client::open(info)
                .map_err(|e| origin.invalid("redis_url", format!("not a usable Redis URL: {e}")))?,
        };
        Ok((RedisServer::Single(client), display))
    }

    /// A cluster: `redis+cluster://` or `rediss+cluster://` seed nodes, with the CA for TLS.
    fn redis_cluster(
        url: &str,
        ca: Option<&Path>,
        origin: &Origin<'_>,
    ) -> Result<(RedisServer, String), ConfigError> {
        let mut seeds = Seeds::parse(url).map_err(|e| {
            origin.invalid(
                "redis_url",
                format!(
                    "not a usable Redis Cluster URL: {e}; expected \
                     redis+cluster://[:password@]host:port[,host:port…] or rediss+cluster://…"
                ),
            )
        })?;
        if let Some(path) = ca {
            let pem = read_ca(path, seeds.is_tls(), "rediss+cluster://", origin)?;
            seeds = seeds.with_ca(pem);
        }
        seeds.client(None).map_err(|e| {
            origin.invalid("redis_url", format!("not a usable Redis Cluster URL: {e}"))
        })?;
        let display = seeds.display();
        Ok((RedisServer::Cluster(seeds), display))
    }
}

/// The CA file at `path` (`redis_ca_file`), which only a TLS URL (`tls`, scheme `tls_scheme`)
/// can use: that is checked first, so a plain URL is the error, not the file.
fn read_ca(
    path: &Path,
    tls: bool,
    tls_scheme: &str,
    origin: &Origin<'_>,
) -> Result<Vec<u8>, ConfigError> {
    if !tls {
        return Err(origin.invalid(
            "redis_ca_file",
            format!("is set but redis_url is not a {tls_scheme} (TLS) URL"),
        ));
    }
    std::fs::read(path).map_err(|e| {
        origin.invalid(
            "redis_ca_file",
            format!("could not read {}: {e}", path.display()),
        )
    })
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
        let text = include_str!("../../config/app.toml");
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
        ];
        for key in keys {
            assert!(
                text.contains(&format!("{key} =")),
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
        assert_eq!(config.history, HistoryConfig::default());
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
