//! [`RawConfig`] and [`Overrides`] → the typed [`Config`]: every key checked (through
//! `confkit`'s checks, naming the file, or the flag a value came from, and the key), defaults
//! filled in, the Redis URL (one server or a cluster's seed list) and its CA file turned into a
//! [`RedisServer`] ready to connect.

use std::path::Path;
use std::time::Duration;

use confkit::Checker;

use super::raw::{Overrides, RawConfig};
use super::*;
use crate::history::HistoryConfig;
use crate::redis::cluster::Seeds;
use crate::redis::server::{RedisConfig, RedisServer};

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

impl RawConfig {
    /// Validates the keys as written; `origin` names the file in errors.
    pub fn validate(self, origin: &str) -> Result<Config, ConfigError> {
        self.validate_with(origin, Overrides::default())
    }

    pub(super) fn validate_with(
        mut self,
        file: &str,
        overrides: Overrides,
    ) -> Result<Config, ConfigError> {
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
        let presence = self.presence(&origin)?;
        let api = self.api(&origin)?;
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
            auth: self.auth.take().unwrap_or_default().validate(file)?,
            presence,
            api,
        })
    }

    fn presence(&self, origin: &Origin<'_>) -> Result<PresenceConfig, ConfigError> {
        let interval = origin.duration_at_least(
            "presence_interval",
            self.presence_interval,
            DEFAULT_PRESENCE_INTERVAL,
            MIN_PRESENCE_INTERVAL,
        )?;
        // A live instance heartbeats every interval: the TTL must outlast a few of them.
        let ttl = origin.duration_at_least(
            "presence_ttl",
            self.presence_ttl,
            DEFAULT_PRESENCE_TTL,
            interval * 5,
        )?;
        Ok(PresenceConfig {
            enabled: self.presence.unwrap_or(true),
            interval,
            ttl,
        })
    }

    fn api(&self, origin: &Origin<'_>) -> Result<Option<ApiConfig>, ConfigError> {
        match (&self.api_listen, &self.api_keys_file) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(origin.invalid(
                "api_keys_file",
                "is required with api_listen: the API takes no request without a key",
            )),
            (None, Some(_)) => Err(origin.invalid(
                "api_listen",
                "is required with api_keys_file (or remove api_keys_file)",
            )),
            (Some(listen), Some(keys)) => {
                let listen = origin.of("api_listen").addr("api_listen", listen)?;
                Ok(Some(ApiConfig {
                    listen,
                    keys_file: keys.clone(),
                }))
            }
        }
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
