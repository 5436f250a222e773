//! `app.toml` as written ([`RawConfig`]: every key optional, unknown keys rejected) and the
//! command line's [`Overrides`]; nothing here judges a value (that is `validate`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::auth::RawAuth;

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
    /// `[auth]`: who may connect.
    pub auth: Option<RawAuth>,
    /// Whether presence is kept and told to members.
    pub presence: Option<bool>,
    /// How often presence changes are sent, gathered.
    #[serde(default, with = "humantime_serde")]
    pub presence_interval: Option<Duration>,
    /// How long a silent instance's members still count.
    #[serde(default, with = "humantime_serde")]
    pub presence_ttl: Option<Duration>,
    /// `ip:port` of the server API's own listener; absent: no API.
    pub api_listen: Option<String>,
    /// File of API keys, one per line.
    pub api_keys_file: Option<PathBuf>,
}

/// Values given on the command line or in the environment; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen ADDR`.
    pub listen: Option<SocketAddr>,
    /// `--redis URL` or `REDIS_URL`; an empty string counts as absent.
    pub redis_url: Option<String>,
}

impl RawConfig {
    /// Parses TOML text; errors carry the line the parser points at, quoted.
    pub fn parse(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
        confkit::parse(text, origin)
    }
}
