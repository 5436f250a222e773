//! WebSocket tunnels through lb over real TLS to a real echo backend: frames of every size
//! class arrive intact both ways, close codes travel in both directions, and an idle tunnel is
//! closed at its timeout.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Payload sizes around the WebSocket length-encoding boundaries, up to 1 MiB.
const SIZES: &[usize] = &[1, 125, 126, 127, 65_535, 65_536, 100_000, 1 << 20];

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn text_and_binary_frames_from_1_byte_to_1_mib_echo_intact() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let mut ws = ws_connect(&pki, lb.addrs().https, "/ws").await;
    for (i, &len) in SIZES.iter().enumerate() {
        let binary = payload(len, i as u8);
        ws_echo(&mut ws, Message::Binary(Bytes::from(binary))).await;
        let text: String = (0..len)
            .map(|j| char::from(b'a' + (j % 26) as u8))
            .collect();
        ws_echo(&mut ws, Message::text(text)).await;
    }
    // The upgrade carried the forwarded headers, like any request.
    let upgrade = &backend.requests()[0];
    assert!(upgrade.upgrade);
    assert_eq!(upgrade.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(upgrade.headers["x-forwarded-proto"], "https");
    assert_eq!(lb.metrics().tunnels_active.load(Relaxed), 1);
    let stats_pool = lb.pool();
    let stats = stats_pool.backends()[0].stats();
    let moved: u64 = SIZES.iter().map(|&n| 2 * n as u64).sum();
    assert!(stats.bytes_to_backend.load(Relaxed) >= moved);
    assert!(stats.bytes_to_client.load(Relaxed) >= moved);
    drop(ws);
    lb.shutdown().await;
}

#[tokio::test]
async fn many_small_frames_in_a_burst_stay_in_order() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let mut ws = ws_connect(&pki, lb.addrs().https, "/ws").await;
    for i in 0..500 {
        within("send", ws.feed(Message::text(format!("m{i}"))))
            .await
            .unwrap();
    }
    within("flush", ws.flush()).await.unwrap();
    for i in 0..500 {
        assert_eq!(ws_next(&mut ws).await, Message::text(format!("m{i}")));
    }
    drop(ws);
    lb.shutdown().await;
}

#[tokio::test]
async fn client_close_code_reaches_the_backend_and_the_answer_comes_back() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let mut ws = ws_connect(&pki, lb.addrs().https, "/ws").await;
    ws_echo(&mut ws, Message::text("hi")).await;
    within(
        "send close",
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(4000),
            reason: "client leaving".into(),
        }))),
    )
    .await
    .unwrap();
    let answer = within("close answer", ws.next()).await;
    match answer {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4000),
        other => panic!("expected the backend's close answer, got {other:?}"),
    }
    wait_until("backend recorded the close", || {
        backend.close_codes() == vec![4000]
    })
    .await;
    // Like a browser, the client closes its connection once the close handshake is done.
    drop(ws);
    let metrics = lb.metrics();
    wait_until("tunnel ended", || metrics.tunnels_active.load(Relaxed) == 0).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn backend_close_code_reaches_the_client_and_the_tunnel_ends() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let mut ws = ws_connect(&pki, lb.addrs().https, "/ws").await;
    within("send", ws.send(Message::text("close:4001")))
        .await
        .unwrap();
    match within("backend close", ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 4001);
            assert_eq!(frame.reason.as_str(), "backend closing");
        }
        other => panic!("expected the backend's close, got {other:?}"),
    }
    // tungstenite answered the close; the stream then ends.
    let end = within("stream end", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            }
        }
    });
    end.await;
    drop(ws);
    let metrics = lb.metrics();
    wait_until("tunnel ended", || metrics.tunnels_active.load(Relaxed) == 0).await;
    wait_until("backend session ended", || backend.ws_open() == 0).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_at_the_timeout_on_both_sides() {
    const IDLE: Duration = Duration::from_secs(1);
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&pki, &[&backend]);
    config.timeouts = format!("tunnel_idle = \"{}ms\"\n", IDLE.as_millis());
    let lb = start_lb(&config).await;
    let mut ws = ws_connect(&pki, lb.addrs().https, "/ws").await;
    ws_echo(&mut ws, Message::text("before idling")).await;
    let idle_since = std::time::Instant::now();
    // Nothing is sent; lb must cut the tunnel by itself, and not before the timeout.
    assert_eq!(ws_end(&mut ws).await, WsEnd::Cut);
    let idle = idle_since.elapsed();
    assert!(
        idle >= IDLE,
        "cut after {idle:?}, before the {IDLE:?} idle timeout"
    );
    wait_until("backend side closed too", || backend.ws_open() == 0).await;
    assert_eq!(
        backend.close_codes(),
        Vec::<u16>::new(),
        "lb made up a close frame"
    );
    assert_eq!(lb.metrics().tunnels_active.load(Relaxed), 0);
    lb.shutdown().await;
}

#[tokio::test]
async fn shutdown_gives_tunnels_a_bounded_drain() {
    const GRACE: Duration = Duration::from_millis(200);
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&pki, &[&backend]);
    config.timeouts = format!("drain_grace = \"{}ms\"\n", GRACE.as_millis());
    let lb = start_lb(&config).await;
    let mut ws = ws_connect(&pki, lb.addrs().https, "/ws").await;
    ws_echo(&mut ws, Message::text("open")).await;
    let shutdown_began = std::time::Instant::now();
    within("shutdown with an open tunnel", lb.shutdown()).await;
    // The tunnel had its grace, then lb cut it (no close frame is made up for either side).
    assert_eq!(ws_end(&mut ws).await, WsEnd::Cut);
    let lasted = shutdown_began.elapsed();
    assert!(
        lasted >= GRACE,
        "cut after {lasted:?}, before the {GRACE:?} grace"
    );
    wait_until("backend side closed", || backend.ws_open() == 0).await;
}
