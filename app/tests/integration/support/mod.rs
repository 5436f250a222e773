//! Test support, written once: a real `redis-server` on an ephemeral port, `app` instances
//! in-process (or the real binary), WebSocket clients and a raw HTTP `GET`.
//!
//! Readiness is awaited, never slept on: Redis is ready when it says so on its output, an in-process
//! app when its listener is bound (it is bound before `run` starts), a binary when it prints
//! `listening http <addr>`, a WebSocket client when its `Ping` comes back as a `Pong` (which
//! proves the server's connection task is running and registered for messages). Waiting for a
//! condition polls it against a deadline. Every process started here is killed on drop.

use std::net::SocketAddr;
use std::process::Stdio;

use futures_util::{SinkExt, StreamExt};
use testkit::redis::{Persistence, RedisTls};
use testkit::wait::eventually;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Upper bound for anything a test waits for; reaching it fails the test.
pub use testkit::wait::DEADLINE;

/// A port that was free a moment ago ([`testkit::redis::free_port`]), for a Redis that an app
/// is pointed at before it runs.
pub fn free_port() -> u16 {
    testkit::redis::free_port().unwrap()
}

/// A `redis-server` child on 127.0.0.1 ([`testkit::redis`]: ready when it says so), in
/// memory only unless it keeps its data; killed on drop.
pub struct Redis {
    server: testkit::redis::Redis,
    tls: Option<Tls>,
}

/// What a TLS `redis-server` needs: a private CA, a certificate for 127.0.0.1, a password.
struct Tls {
    ca: TempFile,
    cert: TempFile,
    key: TempFile,
    password: String,
}

impl Tls {
    fn generate() -> Tls {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        Tls {
            ca: TempFile::new("redis-ca.pem", &ca.pem()),
            cert: TempFile::new("redis-cert.pem", &cert.pem()),
            key: TempFile::new("redis-key.pem", &key.serialize_pem()),
            password: format!("pw-{}@x/y", std::process::id()),
        }
    }
}

impl Redis {
    /// Starts a plain server, in memory only.
    pub async fn start() -> Redis {
        Redis::launch(None, None, Persistence::Off).await
    }

    /// Starts a plain server that keeps its data across restarts (append-only file, fsynced
    /// at every write: what it held survives even SIGKILL).
    pub async fn start_persistent() -> Redis {
        Redis::launch(None, None, Persistence::Always).await
    }

    /// Starts a plain server on `port` that keeps its data across restarts.
    pub async fn start_persistent_on(port: u16) -> Redis {
        Redis::launch(Some(port), None, Persistence::Always).await
    }

    /// Starts a TLS-only server with a password and a private CA, as a managed Redis with
    /// in-transit encryption and an AUTH token is.
    pub async fn start_tls() -> Redis {
        Redis::launch(None, Some(Tls::generate()), Persistence::Off).await
    }

    async fn launch(port: Option<u16>, tls: Option<Tls>, persistence: Persistence) -> Redis {
        let options = testkit::redis::Options {
            tls: tls.as_ref().map(|tls| RedisTls {
                cert: tls.cert.path.clone(),
                key: tls.key.path.clone(),
                ca: tls.ca.path.clone(),
            }),
            password: tls.as_ref().map(|tls| tls.password.clone()),
            persistence,
        };
        let server = match port {
            Some(port) => testkit::redis::Redis::start_on(port, options).await,
            None => testkit::redis::Redis::start_with(options).await,
        };
        match server {
            Ok(server) => Redis { server, tls },
            Err(e) => panic!("{e:#}"),
        }
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://:<password>@127.0.0.1:<port>` with TLS.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The `app.toml` lines that point an app at this server.
    pub fn app_config(&self) -> String {
        match &self.tls {
            None => format!("redis_url = \"{}\"\n", self.url()),
            Some(tls) => format!(
                "redis_url = \"{}\"\nredis_ca_file = \"{}\"\n",
                self.url(),
                tls.ca.as_str()
            ),
        }
    }

    fn client(&self) -> redis::Client {
        match &self.tls {
            None => redis::Client::open(self.url()).unwrap(),
            Some(tls) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(&tls.ca.path).unwrap()),
                },
            )
            .unwrap(),
        }
    }

    /// Kills the server and waits for it to be gone.
    pub async fn stop(&mut self) {
        self.server.stop().await;
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) {
        if let Err(e) = self.server.restart().await {
            panic!("{e:#}");
        }
    }

    /// A raw `SUBSCRIBE` on `channel`, confirmed before this returns.
    pub async fn subscribe(&self, channel: &str) -> RawSubscriber {
        let mut pubsub = self.client().get_async_pubsub().await.unwrap();
        pubsub.subscribe(channel).await.unwrap();
        RawSubscriber { pubsub }
    }

    /// A raw `PUBLISH`; returns how many subscribers received it.
    pub async fn publish(&self, channel: &str, payload: &str) -> i64 {
        self.command(&["PUBLISH", channel, payload]).await
    }

    /// Any command, on a connection of its own; returns the answer.
    pub async fn command<T: redis::FromRedisValue>(&self, words: &[&str]) -> T {
        let mut connection = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut command = redis::cmd(words[0]);
        command.arg(&words[1..]);
        command.query_async(&mut connection).await.unwrap()
    }
}

/// A TCP relay in front of a plain Redis that hides Redis dropping a connection: the client's
/// end stays open and silent, as after a network cut the client has not noticed yet. Every
/// relayed connection ends when this is dropped.
pub struct SilentRelay {
    /// `redis://127.0.0.1:<port>` of the relay.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl SilentRelay {
    /// A relay to `redis`, accepting connections when this returns.
    pub async fn to(redis: &Redis) -> SilentRelay {
        assert!(redis.tls.is_none(), "the relay is for plain redis://");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let upstream = SocketAddr::from(([127, 0, 0, 1], redis.server.port()));
        let task = tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every connection's task.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(relay_silently(client, upstream));
            }
        });
        SilentRelay { url, task }
    }
}

impl Drop for SilentRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until the client closes; once Redis closes, holds the client's end open.
async fn relay_silently(client: TcpStream, upstream: SocketAddr) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    tokio::select! {
        _ = tokio::io::copy(&mut from_client, &mut to_server) => {}
        _ = tokio::io::copy(&mut from_server, &mut to_client) => {
            std::future::pending::<()>().await;
        }
    }
}

/// A plain Redis subscriber, as another program would be.
pub struct RawSubscriber {
    pubsub: redis::aio::PubSub,
}

impl RawSubscriber {
    /// The next payload on the channel.
    pub async fn next(&mut self) -> String {
        let message = tokio::time::timeout(DEADLINE, self.pubsub.on_message().next())
            .await
            .expect("timed out waiting for a message on the Redis channel")
            .expect("Redis subscription ended");
        message.get_payload().unwrap()
    }
}

/// An `app` running in this process on 127.0.0.1 with an ephemeral port.
pub struct App {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its server API listens, when it has one.
    pub api: Option<SocketAddr>,
    /// The API keys file, kept while the app runs.
    _keys: Option<TempFile>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), app::Error>>>,
}

impl App {
    /// Starts an app configured by the TOML `config` (the listener is bound by the test).
    pub async fn start(config: &str) -> App {
        App::launch(config, None).await
    }

    /// Starts an app configured by `config` with the server API on, accepting the keys listed
    /// in `keys` (one per line).
    pub async fn start_with_api(config: &str, keys: &str) -> App {
        App::launch(config, Some(TempFile::new("api-keys", keys))).await
    }

    async fn launch(config: &str, keys: Option<TempFile>) -> App {
        let (config, api_listener) = match &keys {
            None => (config.to_owned(), None),
            Some(keys) => (
                format!(
                    "{config}\napi_listen = \"127.0.0.1:0\"\napi_keys_file = \"{}\"\n",
                    keys.as_str()
                ),
                Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            ),
        };
        let config = app::config::Config::from_toml(&config, "test.toml").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = api_listener.as_ref().map(|l| l.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app::run_with(
            config,
            listener,
            api_listener,
            shutdown.clone(),
        ));
        App {
            addr,
            api,
            _keys: keys,
            shutdown,
            task: Some(task),
        }
    }

    /// A server API call with `key`: the status and the JSON answer.
    pub async fn api_call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let addr = self.api.expect("started without the API");
        let (status, body) = api_call(addr, method, path, key, body).await;
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Starts an app on `redis` with extra TOML lines.
    pub async fn with_redis(redis: &Redis, extra: &str) -> App {
        App::start(&format!("{}{extra}", redis.app_config())).await
    }

    /// Two apps on `redis` with extra TOML lines, both subscribed (`/healthz` 200).
    pub async fn healthy_pair(redis: &Redis, extra: &str) -> (App, App) {
        let one = App::with_redis(redis, extra).await;
        let two = App::with_redis(redis, extra).await;
        one.wait_health(200).await;
        two.wait_health(200).await;
        (one, two)
    }

    /// `GET path`: the status code and body.
    pub async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http_get(self.addr, path).await
    }

    /// Waits until `/healthz` answers `status`.
    pub async fn wait_health(&self, status: u16) {
        eventually(
            &format!("/healthz to answer {status}"),
            DEADLINE,
            || async { anyhow::Ok(self.get("/healthz").await.0 == status) },
        )
        .await
        .unwrap();
    }

    /// A connected WebSocket client, registered for messages.
    pub async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Whether `run` is still running (it must not exit because Redis went away).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Cancels the shutdown token, as SIGTERM does in the binary.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for `run` to return, and returns its result.
    pub async fn finished(&mut self) -> Result<(), app::Error> {
        let task = self.task.take().expect("already finished");
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("app::run did not return in time")
            .unwrap()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `method path` on a server API at `addr` with `key` as bearer and `body` as JSON: the status
/// and the raw body.
pub async fn api_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Vec<u8>) {
    let authorization = key.map(|key| format!("Authorization: Bearer {key}"));
    let mut fields = vec!["Content-Type: application/json"];
    if let Some(field) = &authorization {
        fields.push(field);
    }
    match testkit::http::request(addr, method, path, &fields, body.as_bytes()).await {
        Ok(response) => (response.status, response.body),
        Err(e) => panic!("{e:#}"),
    }
}

/// `GET path` over a fresh connection ([`testkit::http`]): status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    match testkit::http::http_get(addr, path).await {
        Ok(response) => (response.status, response.body),
        Err(e) => panic!("{e:#}"),
    }
}

/// A WebSocket client of an app.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a WebSocket ended, from the client's side.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code.
    Closed(u16),
    /// The connection ended without a close frame.
    Dropped,
}

impl Client {
    /// Connects to `ws://addr/ws?<query>` as a client that resumes (`resume`, or
    /// `epoch=E&last=ID`); returns it with the notice the server sends first, parsed.
    pub async fn resume(addr: SocketAddr, query: &str) -> (Client, serde_json::Value) {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?{query}"))
            .await
            .unwrap();
        let mut client = Client { ws };
        let notice: serde_json::Value = serde_json::from_str(&client.text().await).unwrap();
        assert!(
            notice["recovered"].is_boolean(),
            "not a resume notice: {notice}"
        );
        (client, notice)
    }

    /// Connects to `ws://addr/ws?presence&<query>`; returns it with the presence state the
    /// server sends first (which also proves the connection is counted and served).
    pub async fn with_presence(addr: SocketAddr, query: &str) -> (Client, serde_json::Value) {
        let mut client = Client::upgraded(addr, &format!("presence&{query}")).await;
        let state = client.json().await;
        assert_eq!(state["presence"], "state", "not a presence state: {state}");
        (client, state)
    }

    /// The next presence frame, skipping chat messages.
    pub async fn presence(&mut self) -> serde_json::Value {
        loop {
            let frame = self.json().await;
            if frame.get("presence").is_some() {
                return frame;
            }
        }
    }

    /// Presence frames until one satisfies `done`; returns them all, that one last.
    pub async fn presence_until(
        &mut self,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.presence().await;
            let finished = done(&frame);
            frames.push(frame);
            if finished {
                return frames;
            }
        }
    }

    /// Connects to `ws://addr/ws` and waits until the server's connection task runs.
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::connect_with(addr, "").await
    }

    /// Connects to `ws://addr/ws?<query>` (e.g. `room=lobby`) as a client of the original
    /// protocol and waits until the server's connection task serves it.
    pub async fn connect_with(addr: SocketAddr, query: &str) -> Client {
        let mut client = Client::upgraded(addr, query).await;
        client.sync().await;
        client
    }

    /// Connects to `ws://addr/ws?<query>` and returns as soon as the handshake is answered,
    /// without waiting for anything else.
    pub async fn upgraded(addr: SocketAddr, query: &str) -> Client {
        let url = if query.is_empty() {
            format!("ws://{addr}/ws")
        } else {
            format!("ws://{addr}/ws?{query}")
        };
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client { ws }
    }

    /// Token mode: connects to `ws://addr/ws?<query>`, sends `token` as the first frame and
    /// returns the client with the server's `{"auth": "ok", ...}` answer.
    pub async fn signed_in(
        addr: SocketAddr,
        query: &str,
        token: &str,
    ) -> (Client, serde_json::Value) {
        let mut client = Client::upgraded(addr, query).await;
        client.send_token(token).await;
        let welcome = client.json().await;
        assert_eq!(welcome["auth"], "ok", "{welcome}");
        (client, welcome)
    }

    /// Token mode: sends `{"token": token}`.
    pub async fn send_token(&mut self, token: &str) {
        self.send_text(&serde_json::json!({ "token": token }).to_string())
            .await;
    }

    /// Sends a `Ping` and waits for its `Pong`, skipping nothing else: no message may be
    /// pending when this is called.
    pub async fn sync(&mut self) {
        self.ws
            .send(Message::Ping(b"sync"[..].into()))
            .await
            .unwrap();
        match self.next().await {
            Message::Pong(payload) => assert_eq!(&payload[..], b"sync"),
            other => panic!("expected the Pong, got {other:?}"),
        }
    }

    /// Sends `text` as a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends a chat message with a client message id.
    pub async fn say_with_cid(&mut self, name: &str, content: &str, cid: &str) {
        let json = serde_json::json!({ "name": name, "content": content, "cid": cid });
        self.send_text(&json.to_string()).await;
    }

    /// The next text frame, parsed as JSON.
    pub async fn json(&mut self) -> serde_json::Value {
        serde_json::from_str(&self.text().await).unwrap()
    }

    /// Sends a chat message.
    pub async fn say(&mut self, name: &str, content: &str) {
        let json = serde_json::json!({ "name": name, "content": content }).to_string();
        self.send_text(&json).await;
    }

    /// Sends chat messages `(name, content)` in one write: the server reads them back to back,
    /// however slow the machine is.
    pub async fn say_at_once(&mut self, messages: &[(&str, &str)]) {
        for (name, content) in messages {
            let json = serde_json::json!({ "name": name, "content": content }).to_string();
            self.ws.feed(Message::text(json)).await.unwrap();
        }
        self.ws.flush().await.unwrap();
    }

    /// Sends any frame.
    pub async fn send(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// The next frame other than the server's pings (answered by the WebSocket layer).
    async fn next(&mut self) -> Message {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("timed out waiting for a WebSocket message")
                .expect("WebSocket ended")
                .expect("WebSocket error");
            if !matches!(message, Message::Ping(_)) {
                return message;
            }
        }
    }

    /// The next frame other than a ping, or `None` when the connection ended or failed.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            let next = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("timed out waiting for a WebSocket message");
            match next {
                Some(Ok(Message::Ping(_))) => {}
                Some(Ok(message)) => return Some(message),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next text frame.
    pub async fn text(&mut self) -> String {
        match self.next().await {
            Message::Text(text) => text.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next text frame, which must be `{"error": "..."}` (with `"retry": true` for what
    /// may succeed later); returns the reason.
    pub async fn error(&mut self) -> String {
        let text = self.text().await;
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let object = value.as_object().expect("not an object");
        let retry = object.get("retry").is_some_and(|r| r == true);
        assert_eq!(object.len(), 1 + usize::from(retry), "{text}");
        object["error"]
            .as_str()
            .expect("no error string")
            .to_owned()
    }

    /// Reads until the connection ends, skipping text frames (at most `max_texts`).
    pub async fn ended(&mut self, max_texts: usize) -> Ended {
        let mut texts = 0;
        loop {
            let next = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("timed out waiting for the WebSocket to end");
            match next {
                Some(Ok(Message::Close(frame))) => {
                    return Ended::Closed(frame.map_or(1005, |f| f.code.into()));
                }
                Some(Ok(Message::Text(_))) => {
                    texts += 1;
                    assert!(
                        texts <= max_texts,
                        "more than {max_texts} messages before the end"
                    );
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ended::Dropped,
            }
        }
    }

    /// Closes the connection normally and waits for the server's answer.
    pub async fn close(mut self) {
        self.ws.close(None).await.unwrap();
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}

/// A WebSocket handshake with an `Origin` header: the HTTP status if refused, 101 if accepted.
pub async fn handshake_status(addr: SocketAddr, origin: Option<&str>) -> u16 {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// A WebSocket handshake on `/ws?<query>`: 101 and nothing if accepted, else the HTTP status
/// and the body of the refusal.
pub async fn handshake_answer(addr: SocketAddr, query: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws?{query}")).await {
        Ok((_, response)) => (response.status().as_u16(), String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            (response.status().as_u16(), String::from_utf8(body).unwrap())
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// Checks the original simple-chat shape: `time`, `name`, `content`, in that order, with
/// `time` as `YYYY/MM/DD HH:MM:SS`, followed by our additive `id` and `epoch` (both or
/// neither: a message of the original app has none); returns the parsed message.
pub fn assert_chat_shape(text: &str) -> app::protocol::ChatMessage {
    assert!(text.starts_with("{\"time\":\""), "{text}");
    let value: serde_json::Value = serde_json::from_str(text).unwrap();
    let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    // A signed-in author's message adds `user`.
    keys.retain(|key| key != "user");
    assert!(
        keys == ["content", "name", "time"] || keys == ["content", "epoch", "id", "name", "time"],
        "{text}"
    );
    let message: app::protocol::ChatMessage = serde_json::from_str(text).unwrap();
    let time = message.time.as_bytes();
    assert_eq!(time.len(), 19, "{text}");
    assert!(
        time.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'/',
            10 => *b == b' ',
            13 | 16 => *b == b':',
            _ => b.is_ascii_digit(),
        }),
        "{text}"
    );
    let name_at = text.find("\"name\"").unwrap();
    let content_at = text.find("\"content\"").unwrap();
    assert!(name_at < content_at, "{text}");
    message
}

/// The real `app` binary as a child process; killed on drop.
pub struct Binary {
    child: Child,
    /// The address from its `listening http` line.
    pub addr: SocketAddr,
    /// The address from its `listening api` line, once printed.
    api: tokio::sync::watch::Receiver<Option<SocketAddr>>,
}

impl Binary {
    /// Runs `app` with `args` and waits for its `listening http <addr>` line.
    pub async fn start(args: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_app"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("app did not print its listening line in time")
            .unwrap()
            .expect("app exited before listening");
        let addr = line
            .strip_prefix("listening http ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        // Drain the logs so the child never blocks on a full pipe; they show with the test's
        // output if it fails.
        let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = logs.next_line().await {
                eprintln!("app: {line}");
            }
        });
        // Keep reading stdout: the API's line may follow.
        let (api_tx, api) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("listening api ") {
                    let _ = api_tx.send(addr.parse().ok());
                }
            }
        });
        Binary { child, addr, api }
    }

    /// The address of its `listening api` line, once printed.
    pub async fn api_addr(&mut self) -> SocketAddr {
        let addr = tokio::time::timeout(DEADLINE, self.api.wait_for(Option::is_some))
            .await
            .expect("app did not print its API line in time")
            .expect("app exited before printing its API line");
        addr.unwrap()
    }

    /// Sends SIGTERM by PID.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `HUP`, `KILL`) by PID.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("already exited");
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("app did not exit in time")
            .unwrap()
            .code()
    }
}

/// Runs `app` with `args` to completion: exit code and standard error.
pub async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = tokio::time::timeout(
        DEADLINE,
        Command::new(env!("CARGO_BIN_EXE_app"))
            .args(args)
            .env_remove("REDIS_URL")
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("app did not exit in time")
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A file under the system temp directory, removed on drop.
pub struct TempFile {
    /// Its path.
    pub path: std::path::PathBuf,
}

impl TempFile {
    /// Writes `contents` to a fresh file whose name contains `name`.
    pub fn new(name: &str, contents: &str) -> TempFile {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("app-test-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile { path }
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
