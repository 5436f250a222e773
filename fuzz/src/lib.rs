//! What the fuzz targets share: lb's own HTTP/1.1 server (`lb::front::conn::http1_server`, the same
//! hyper configuration and limits a client connection gets) run over an in-memory connection, so
//! the request targets see exactly the requests hyper would hand to `lb::http::proxy::handle`; and the
//! network sandbox of the configuration target.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::OnceLock;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lb::http::body::ResponseBody;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The smallest valid `lb.toml`: nothing in it is read from disk or resolved.
const LB_TOML: &str =
    "[[certificates]]\npem = \"site.pem\"\n\n[[backends]]\naddr = \"127.0.0.1:8081\"\n";

/// The configuration whose limits the request targets run under (lb's defaults).
pub fn lb_config() -> &'static lb::Config {
    static CONFIG: OnceLock<lb::Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        lb::Config::parse(LB_TOML, "fuzz.toml", Path::new("/"), &Default::default())
            .unwrap_or_else(|e| panic!("the harness configuration is invalid: {e}"))
    })
}

/// The client address a request comes from: an IPv4 or an IPv6 one, chosen by `input`.
pub fn client_for(input: &[u8]) -> IpAddr {
    if input.len().is_multiple_of(2) {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7))
    }
}

/// One current-thread runtime for the whole fuzzing run.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("no tokio runtime: {e}"))
    })
}

/// Feeds `input` as the bytes a client sent (then end of stream) to lb's HTTP/1.1 server and
/// calls `handle` on every request hyper parses from them, as `lb::http::proxy::handle` would be.
/// Returns the bytes the server answered.
pub fn serve_http1<F>(input: &[u8], handle: F) -> Vec<u8>
where
    F: Fn(Request<Incoming>) -> Response<ResponseBody>,
{
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = service_fn(|req| {
            let response = handle(req);
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let connection = lb::front::conn::http1_server(lb_config())
            .serve_connection(TokioIo::new(server), service);
        let peer = async {
            let mut answer = Vec::new();
            if client.write_all(input).await.is_ok() && client.shutdown().await.is_ok() {
                let _ = client.read_to_end(&mut answer).await;
            }
            answer
        };
        // A malformed request is the connection's error; what matters is how it got there.
        let (_, answer) = tokio::join!(connection, peer);
        answer
    })
}

/// An empty answer with `status`.
pub fn answer(status: StatusCode) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = status;
    response
}

/// Moves this thread into a new network namespace with no interface up, so that whatever an
/// input makes the code under test resolve (`lb`'s backend addresses may be DNS names) fails at
/// once instead of sending queries off the machine. Tries a plain network namespace (root),
/// then one inside a new user namespace (unprivileged); panics if neither is possible, since
/// fuzzing without it would send DNS traffic.
pub fn isolate_network() {
    // SAFETY: unshare(2) takes flags only; it touches no memory of this process.
    #[allow(unsafe_code)]
    let plain = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if plain == 0 {
        return;
    }
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let with_user = unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) };
    if with_user != 0 {
        panic!(
            "cannot enter a network namespace ({}): run as root or under `unshare -rn`",
            std::io::Error::last_os_error()
        );
    }
}
