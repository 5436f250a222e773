//! Token mode against real sockets, a real Redis and the real binary: signed-in messages carry
//! the token's identity on every instance; each hostile or wrong token is refused with its
//! close code before the client hears anything, and nothing reaches anyone else; grants,
//! refresh, expiry, the per-user limit across instances (and after an instance dies), the
//! operator's disconnect everywhere, and key rotation by SIGHUP.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    App, Binary, Client, Ended, Redis, api_call, assert_chat_shape, http_get, run_binary,
};
use testkit::wait::{DEADLINE, eventually};

const ISSUER: &str = "https://login.test";
const AUDIENCE: &str = "scaleout";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The keys of a deployment: an HS256 secret and an ES256 key pair (kid `ec1`), in files.
struct Keys {
    dir: tempfile::TempDir,
    secret: Vec<u8>,
    ec_private: String,
    ec_public: String,
}

fn owner_only(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let secret: Vec<u8> = (0..48u8).map(|i| b'a' + i % 26).collect();
        owner_only(&dir.path().join("secret"), &secret);
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let keys = Keys {
            dir,
            secret,
            ec_private: pair.serialize_pem(),
            ec_public: pair.public_key_pem(),
        };
        std::fs::write(keys.path("ec.pub.pem"), &keys.ec_public).unwrap();
        keys
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `[auth]` section verifying with both keys, with `extra` lines.
    fn auth(&self, extra: &str) -> String {
        format!(
            "[auth]\nmode = \"token\"\nsecret_file = \"{}\"\nissuer = \"{ISSUER}\"\n\
             audience = \"{AUDIENCE}\"\npublic_rooms = [\"lobby\"]\n{extra}\n\
             [[auth.keys]]\nkid = \"ec1\"\nalgorithm = \"ES256\"\npublic_key_file = \"{}\"\n",
            self.path("secret").display(),
            self.path("ec.pub.pem").display(),
        )
    }

    /// An HS256 token with `claims`.
    fn hs256(&self, claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(&self.secret).unwrap(),
        )
        .unwrap()
    }

    /// An ES256 token (kid `ec1`) with `claims`.
    fn es256(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("ec1".into());
        let key = EncodingKey::from_ec_pem(self.ec_private.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// A valid token of `sub` (display name `name`) granting `rooms`.
    fn token(&self, sub: &str, name: &str, rooms: &[&str]) -> String {
        self.hs256(&claims(sub, json!({ "name": name, "rooms": rooms })))
    }
}

/// Valid claims for `sub`, lasting ten minutes, with `extra` merged in.
fn claims(sub: &str, extra: Value) -> Value {
    let now = now();
    let mut claims = json!({
        "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600,
    });
    if let (Some(claims), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        claims.extend(extra);
    }
    claims
}

/// Connects to `query`, sends `first` (if any), and returns how the server ended the
/// connection; no text frame may arrive before the end.
async fn refused(addr: std::net::SocketAddr, query: &str, first: Option<&str>) -> Ended {
    let mut client = Client::upgraded(addr, query).await;
    if let Some(first) = first {
        client.send_text(first).await;
    }
    client.ended(0).await
}

/// Connects to `query` and sends `token`: the client if the server signed it in, else what
/// came instead.
async fn try_sign_in(
    addr: std::net::SocketAddr,
    query: &str,
    token: &str,
) -> Result<Client, String> {
    let mut client = Client::upgraded(addr, query).await;
    client.send_token(token).await;
    match client.next_message().await {
        Some(Message::Text(text)) if text.contains("\"auth\":\"ok\"") => Ok(client),
        other => Err(format!("{other:?}")),
    }
}

/// Signs `token` in at `addr` as soon as the server lets it (a place freed elsewhere).
async fn signed_in_eventually(
    what: &str,
    within: Duration,
    addr: std::net::SocketAddr,
    token: &str,
) -> Client {
    eventually(what, within, || async {
        anyhow::Ok(try_sign_in(addr, "", token).await.ok())
    })
    .await
    .unwrap()
}

fn token_frame(token: &str) -> String {
    json!({ "token": token }).to_string()
}

/// Signed-in witnesses in the main room and in `staff`; `quiet` checks that nothing reached
/// them: each sends a message and the first thing it hears is that message.
struct Witnesses {
    main: Client,
    staff: Client,
}

impl Witnesses {
    async fn join(app: &App, keys: &Keys) -> Witnesses {
        let token = keys.token("wit", "Witness", &["staff"]);
        let (main, _) = Client::signed_in(app.addr, "", &token).await;
        let (staff, _) = Client::signed_in(app.addr, "room=staff", &token).await;
        Witnesses { main, staff }
    }

    async fn quiet(&mut self) {
        for client in [&mut self.main, &mut self.staff] {
            client.send_text(r#"{"content": "still here"}"#).await;
            let message = assert_chat_shape(&client.text().await);
            assert_eq!(
                message.content, "still here",
                "the witness saw something else"
            );
        }
    }
}

#[tokio::test]
async fn hostile_and_wrong_tokens_are_refused_before_anything_is_delivered() {
    let keys = Keys::new();
    let app = App::start(&keys.auth("token_timeout = \"300ms\"")).await;
    let mut witnesses = Witnesses::join(&app, &keys).await;
    let addr = app.addr;
    let unauthorized = Ended::Closed(app::auth::CLOSE_UNAUTHORIZED);

    // No token: silence past the deadline, or a chat message first.
    assert_eq!(refused(addr, "", None).await, unauthorized, "silence");
    let chat = json!({"name": "x", "content": "no token"}).to_string();
    assert_eq!(refused(addr, "", Some(&chat)).await, unauthorized);

    let valid = claims("mallory", json!({}));
    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let none = format!(
        "{}.{}.",
        encode(&json!({"alg": "none", "typ": "JWT"})),
        encode(&valid)
    );
    // HS256 keyed with the ES256 public key's bytes: algorithm confusion.
    let mut confused = Header::new(Algorithm::HS256);
    confused.kid = Some("ec1".into());
    let confused = jsonwebtoken::encode(
        &confused,
        &valid,
        &EncodingKey::from_secret(keys.ec_public.as_bytes()).unwrap(),
    )
    .unwrap();
    let with_kid = |kid: &str| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(
            &header,
            &valid,
            &EncodingKey::from_secret(&keys.secret).unwrap(),
        )
        .unwrap()
    };
    let good = keys.hs256(&valid);
    let mut bad_signature = good.clone();
    let last = bad_signature.pop().unwrap();
    bad_signature.push(if last == 'A' { 'B' } else { 'A' });
    let mut no_sub = valid.clone();
    no_sub.as_object_mut().unwrap().remove("sub");
    let cases: Vec<(&str, String)> = vec![
        ("alg none", none),
        ("HMAC with a public key", confused),
        ("unknown kid", with_kid("no-such-key")),
        ("injected kid", with_kid("../../../etc/passwd")),
        ("bad signature", bad_signature),
        (
            "expired",
            keys.hs256(&claims("mallory", json!({"exp": now() - 3600}))),
        ),
        (
            "nbf ahead",
            keys.hs256(&claims("mallory", json!({"nbf": now() + 3600}))),
        ),
        (
            "wrong iss",
            keys.hs256(&claims("mallory", json!({"iss": "https://evil.test"}))),
        ),
        (
            "wrong aud",
            keys.hs256(&claims("mallory", json!({"aud": "other"}))),
        ),
        ("missing sub", keys.hs256(&no_sub)),
        ("garbage", "not.a.token".into()),
        ("truncated", good[..good.len() / 2].into()),
        ("12 KiB", "a".repeat(12 * 1024)),
    ];
    for (case, token) in &cases {
        assert_eq!(
            refused(addr, "", Some(&token_frame(token))).await,
            unauthorized,
            "{case}"
        );
    }
    // A token bigger than a frame may be is refused by the WebSocket layer.
    let huge = token_frame(&"a".repeat(64 * 1024));
    assert_eq!(refused(addr, "", Some(&huge)).await, Ended::Closed(1009));
    // A valid token, a room it does not grant.
    let plain = token_frame(&keys.token("mallory", "Mallory", &[]));
    assert_eq!(
        refused(addr, "room=staff", Some(&plain)).await,
        Ended::Closed(app::auth::CLOSE_FORBIDDEN)
    );
    witnesses.quiet().await;
}

#[tokio::test]
async fn identity_comes_from_the_token_and_grants_decide_the_rooms() {
    let keys = Keys::new();
    let app = App::start(&keys.auth("")).await;
    let (mut alice, welcome) =
        Client::signed_in(app.addr, "", &keys.token("alice", "Alice", &[])).await;
    assert_eq!(
        (&welcome["user"], &welcome["name"]),
        (&json!("alice"), &json!("Alice"))
    );
    // Asymmetric keys work beside the secret.
    let bob_token = keys.es256(&claims("bob", json!({"rooms": ["staff*"]})));
    let (mut bob, _) = Client::signed_in(app.addr, "", &bob_token).await;

    // Another name is refused; the token's own name, or none, is the author.
    alice
        .send_text(r#"{"name": "Bob", "content": "it was bob"}"#)
        .await;
    assert!(alice.error().await.contains("signed-in name"));
    alice.send_text(r#"{"content": "hello"}"#).await;
    for client in [&mut bob, &mut alice] {
        let text = client.text().await;
        let message = assert_chat_shape(&text);
        assert_eq!(
            (message.name.as_str(), message.user.as_deref()),
            ("Alice", Some("alice")),
            "{text}"
        );
        assert!(text.find("\"user\"") > text.find("\"content\""), "{text}");
    }
    bob.send_text(r#"{"name": "bob", "content": "same name is fine"}"#)
        .await;
    let message = assert_chat_shape(&alice.text().await);
    assert_eq!(message.user.as_deref(), Some("bob"));

    // Public rooms take any valid token; a prefix grant opens every room under it.
    Client::signed_in(app.addr, "room=lobby", &keys.token("alice", "Alice", &[])).await;
    Client::signed_in(app.addr, "room=staff-ops", &bob_token).await;
    let denied = refused(
        app.addr,
        "room=staff-ops",
        Some(&token_frame(&keys.token("alice", "Alice", &["staff"]))),
    )
    .await;
    assert_eq!(denied, Ended::Closed(app::auth::CLOSE_FORBIDDEN));
}

#[tokio::test]
async fn a_refresh_keeps_the_connection_and_expiry_or_another_user_ends_it() {
    let keys = Keys::new();
    let app = App::start(&keys.auth("refresh_before = \"2s\"")).await;
    let short = |sub: &str, seconds: u64| keys.hs256(&claims(sub, json!({"exp": now() + seconds})));
    let (mut alice, _) = Client::signed_in(app.addr, "", &short("alice", 3)).await;
    let notice = alice.json().await;
    assert_eq!(notice["refresh"], true, "{notice}");
    assert!(notice["in"].as_u64().unwrap() <= 3, "{notice}");
    alice.send_token(&short("alice", 600)).await;
    let renewed = alice.json().await;
    assert_eq!(renewed["auth"], "ok", "{renewed}");
    assert!(renewed["expires_in"].as_u64().unwrap() > 500, "{renewed}");

    // Without a refresh the connection ends at expiry.
    let (mut bob, _) = Client::signed_in(app.addr, "", &short("bob", 2)).await;
    let notice = bob.json().await;
    assert_eq!(notice["refresh"], true, "{notice}");
    assert_eq!(
        bob.ended(0).await,
        Ended::Closed(app::auth::CLOSE_UNAUTHORIZED)
    );

    // The refreshed connection outlived its first token and still talks.
    alice
        .send_text(r#"{"content": "after the first token"}"#)
        .await;
    let message = assert_chat_shape(&alice.text().await);
    assert_eq!(message.user.as_deref(), Some("alice"));

    // A refresh with another user's token ends the connection without switching identity.
    let (mut carol, _) = Client::signed_in(app.addr, "", &short("carol", 600)).await;
    alice.send_token(&short("mallory", 600)).await;
    assert_eq!(
        alice.ended(0).await,
        Ended::Closed(app::auth::CLOSE_FORBIDDEN)
    );
    carol.send_text(r#"{"content": "only me"}"#).await;
    let message = assert_chat_shape(&carol.text().await);
    assert_eq!(
        message.user.as_deref(),
        Some("carol"),
        "nothing from mallory came first"
    );
}

#[tokio::test]
async fn identity_limits_and_disconnects_hold_across_instances() {
    let keys = Keys::new();
    let redis = Redis::start().await;
    let (one, two) = App::healthy_pair(&redis, &keys.auth("max_connections_per_user = 2")).await;
    let alice = keys.token("alice", "Alice", &[]);
    let (mut on_one, _) = Client::signed_in(one.addr, "", &alice).await;
    let (mut on_two, _) = Client::signed_in(two.addr, "", &alice).await;
    let (mut bob, _) = Client::signed_in(two.addr, "", &keys.token("bob", "Bob", &[])).await;

    // Stamped on one instance, delivered with the identity on the other.
    on_one.send_text(r#"{"content": "from one"}"#).await;
    for client in [&mut on_two, &mut bob] {
        let message = assert_chat_shape(&client.text().await);
        assert_eq!(message.user.as_deref(), Some("alice"));
    }
    assert_eq!(
        assert_chat_shape(&on_one.text().await).user.as_deref(),
        Some("alice")
    );

    // A third connection of alice, on either instance, is over her limit; bob is not.
    assert_eq!(
        refused(one.addr, "", Some(&token_frame(&alice))).await,
        Ended::Closed(app::CLOSE_USER_LIMIT)
    );
    // A token's own max_conns wins over the config.
    let roomy = keys.hs256(&claims("alice", json!({"max_conns": 3})));
    let (third, _) = Client::signed_in(one.addr, "", &roomy).await;
    third.close().await;
    // A closed connection gives its place back.
    on_one.close().await;
    let mut on_one =
        signed_in_eventually("alice's place to be free", DEADLINE, one.addr, &alice).await;

    // The operator disconnects alice everywhere, and keeps her out for an hour.
    let (code, stderr) = run_binary(
        &[
            "disconnect",
            "--redis",
            &redis.url(),
            "--user",
            "alice",
            "--until",
            "1h",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    for client in [&mut on_one, &mut on_two] {
        assert_eq!(
            client.ended(1).await,
            Ended::Closed(app::CLOSE_DISCONNECTED)
        );
    }
    assert_eq!(
        refused(two.addr, "", Some(&token_frame(&alice))).await,
        Ended::Closed(app::auth::CLOSE_FORBIDDEN)
    );
    bob.send_text(r#"{"content": "bob stays"}"#).await;
    assert_eq!(assert_chat_shape(&bob.text().await).content, "bob stays");
}

#[tokio::test]
async fn a_dead_instances_connections_stop_counting() {
    let keys = Keys::new();
    let redis = Redis::start().await;
    let config = keys.path("app.toml");
    std::fs::write(
        &config,
        format!(
            "{}{}",
            redis.app_config(),
            keys.auth("max_connections_per_user = 1")
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let mut doomed = Binary::start(&["--config", &config, "--listen", "127.0.0.1:0"]).await;
    eventually("the instance to subscribe", DEADLINE, || async {
        anyhow::Ok(http_get(doomed.addr, "/healthz").await.0 == 200)
    })
    .await
    .unwrap();
    let alice = keys.token("alice", "Alice", &[]);
    let _held = signed_in_eventually(
        "the instance to accept alice",
        DEADLINE,
        doomed.addr,
        &alice,
    )
    .await;
    let survivor = App::with_redis(&redis, &keys.auth("max_connections_per_user = 1")).await;
    survivor.wait_health(200).await;
    assert_eq!(
        refused(survivor.addr, "", Some(&token_frame(&alice))).await,
        Ended::Closed(app::CLOSE_USER_LIMIT)
    );
    doomed.signal("KILL");
    assert!(doomed.exit_code().await.is_none(), "killed by a signal");
    // Within the count's lifetime (and a margin), the dead instance's connection is forgotten.
    signed_in_eventually(
        "the dead instance's connection to stop counting",
        app::users::COUNT_TTL + Duration::from_secs(15),
        survivor.addr,
        &alice,
    )
    .await;
}

#[tokio::test]
async fn sighup_reloads_the_keys_and_keeps_every_connection() {
    let keys = Keys::new();
    let config = keys.path("app.toml");
    std::fs::write(&config, keys.auth("")).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let app = Binary::start(&["--config", &config, "--listen", "127.0.0.1:0"]).await;
    let old = keys.token("alice", "Alice", &[]);
    let (mut alice, _) = Client::signed_in(app.addr, "", &old).await;

    // The secret is replaced; until SIGHUP the old one still verifies.
    let new_secret = vec![b'z'; 40];
    owner_only(&keys.path("secret"), &new_secret);
    let new = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("bob", json!({})),
        &EncodingKey::from_secret(&new_secret).unwrap(),
    )
    .unwrap();
    app.signal("HUP");
    let mut bob = signed_in_eventually(
        "a token of the new key to be accepted",
        DEADLINE,
        app.addr,
        &new,
    )
    .await;
    assert_eq!(
        refused(app.addr, "", Some(&token_frame(&old))).await,
        Ended::Closed(app::auth::CLOSE_UNAUTHORIZED),
        "the removed key no longer verifies"
    );
    alice.send_text(r#"{"content": "still connected"}"#).await;
    for client in [&mut bob, &mut alice] {
        assert_eq!(
            assert_chat_shape(&client.text().await).content,
            "still connected"
        );
    }
}

#[tokio::test]
async fn the_server_api_sees_a_signed_in_user_and_disconnects_it_everywhere() {
    let keys = Keys::new();
    let redis = Redis::start().await;
    let api_keys = keys.path("api-keys");
    std::fs::write(&api_keys, "api-key-0123456789\n").unwrap();
    let config = keys.path("app.toml");
    std::fs::write(
        &config,
        format!(
            "api_listen = \"127.0.0.1:0\"\napi_keys_file = \"{}\"\n{}{}",
            api_keys.display(),
            redis.app_config(),
            keys.auth("")
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let mut app = Binary::start(&["--config", &config, "--listen", "127.0.0.1:0"]).await;
    let api = app.api_addr().await;
    eventually("the instance to subscribe", DEADLINE, || async {
        anyhow::Ok(http_get(app.addr, "/healthz").await.0 == 200)
    })
    .await
    .unwrap();
    let alice = keys.token("alice", "Alice", &[]);
    let mut first = signed_in_eventually("alice to sign in", DEADLINE, app.addr, &alice).await;
    let (mut bob, _) = Client::signed_in(app.addr, "", &keys.token("bob", "Bob", &[])).await;
    let key = Some("api-key-0123456789");
    eventually("alice to be online", DEADLINE, || async {
        let (status, body) = api_call(api, "GET", "/api/users/alice", key, "").await;
        let body: Value = serde_json::from_slice(&body)?;
        anyhow::Ok(status == 200 && body["online"] == true)
    })
    .await
    .unwrap();

    let (status, body) = api_call(
        api,
        "POST",
        "/api/users/alice/disconnect",
        key,
        "{\"until\": 5}",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer,
        json!({"user": "alice", "until": null}),
        "a past until keeps no one out"
    );
    assert_eq!(first.ended(2).await, Ended::Closed(app::CLOSE_DISCONNECTED));
    // Without --until she may come back.
    let mut again = signed_in_eventually("alice to come back", DEADLINE, app.addr, &alice).await;
    let until = now() + 3600;
    let (status, _) = api_call(
        api,
        "POST",
        "/api/users/alice/disconnect",
        key,
        &format!("{{\"until\": {until}}}"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again.ended(2).await, Ended::Closed(app::CLOSE_DISCONNECTED));
    assert_eq!(
        refused(app.addr, "", Some(&token_frame(&alice))).await,
        Ended::Closed(app::auth::CLOSE_FORBIDDEN)
    );
    for (path, body) in [
        ("/api/users/alice/disconnect", "{\"until\": \"soon\"}"),
        ("/api/users/alice/disconnect", "{\"other\": 1}"),
    ] {
        assert_eq!(
            api_call(api, "POST", path, key, body).await.0,
            400,
            "{body}"
        );
    }
    assert_eq!(
        api_call(api, "POST", "/api/users/alice/disconnect", None, "")
            .await
            .0,
        401
    );
    bob.send_text(r#"{"content": "bob stays"}"#).await;
    assert_eq!(assert_chat_shape(&bob.text().await).content, "bob stays");
    app.terminate();
    app.exit_code().await;
}

#[tokio::test]
async fn app_disconnect_without_redis_says_so_and_exits_64() {
    let (code, stderr) = run_binary(&["disconnect", "--user", "alice"], &[]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("no Redis configured"), "{stderr}");
    let (code, stderr) =
        run_binary(&["disconnect", "--user", "alice", "--until", "soon"], &[]).await;
    assert_eq!(code, Some(2), "clap's usage error: {stderr}");
    assert!(stderr.contains("neither a time"), "{stderr}");
}
