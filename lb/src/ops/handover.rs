//! Binary upgrade: the running process hands its listening sockets and session ticket keys to
//! a new process over a Unix socket (SCM_RIGHTS), the way HAProxy's `expose-fd listeners` and
//! Envoy's hot restart do, so that not one connection is refused and no tunnel is cut.
//!
//! How it works: [`upgrade`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, IoSlice, IoSliceMut, Write as _};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncBufReadExt, BufReader, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use crate::ops::server::{Inherited, Lb, ListenerKind, ListeningSocket};

/// The environment variable that tells a new process where to take over from.
pub const TAKEOVER_ENV: &str = "LB_TAKEOVER_FROM";

/// How long the new process has to connect, start serving and answer `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the new process waits for the old one's message.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first line of a handover message.
const MAGIC: &str = "lb-handover 1";

/// Largest handover message (three listener lines and two keys use a few hundred bytes).
const MAX_MESSAGE: usize = 4096;

/// Most sockets a handover carries (one per [`ListenerKind`]).
const MAX_SOCKETS: usize = ListenerKind::ALL.len();

/// How to start the next version: the program file and the arguments this process had.
#[derive(Debug, Clone)]
pub struct Successor {
    /// The binary, as this process was started from it (its path, not the running image).
    pub program: PathBuf,
    /// Arguments, without the program name.
    pub args: Vec<OsString>,
}

/// Why a handover failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Local I/O (the handover directory or socket, starting the process).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The new process ended before it was ready.
    #[error("the new process exited with {0} before taking over")]
    Exited(ExitStatus),
    /// The new process did not become ready in time.
    #[error("the new process was not ready within {0:?}; it was stopped")]
    Timeout(Duration),
    /// The other side broke the protocol.
    #[error("{0}")]
    Protocol(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> HandoverError {
    let what = what.into();
    move |source| HandoverError::Io { what, source }
}

/// The text part of a handover message.
#[derive(Debug, PartialEq, Eq)]
struct Payload {
    /// Kind and configured address of each attached socket, in order.
    listeners: Vec<(ListenerKind, SocketAddr)>,
    /// The exported ticket keys.
    ticket_keys: Vec<u8>,
}

impl Payload {
    fn encode(&self) -> String {
        let mut text = format!("{MAGIC}\n");
        for (kind, addr) in &self.listeners {
            let _ = writeln!(text, "listener {} {addr}", kind.name());
        }
        let _ = writeln!(text, "tickets {}", STANDARD.encode(&self.ticket_keys));
        text
    }

    fn decode(text: &str) -> Result<Payload, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("not a handover message (expected {MAGIC:?})"));
        }
        let mut listeners = Vec::new();
        let mut ticket_keys = None;
        for line in lines {
            match line.split_once(' ') {
                Some(("listener", rest)) => {
                    let (name, addr) = rest
                        .split_once(' ')
                        .ok_or_else(|| format!("bad listener line {line:?}"))?;
                    let kind = ListenerKind::ALL
                        .into_iter()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| format!("unknown listener kind {name:?}"))?;
                    let addr = addr
                        .parse()
                        .map_err(|_| format!("bad listener address {addr:?}"))?;
                    listeners.push((kind, addr));
                }
                Some(("tickets", _)) if ticket_keys.is_some() => {
                    return Err("two tickets lines".into());
                }
                Some(("tickets", encoded)) => {
                    ticket_keys = Some(
                        STANDARD
                            .decode(encoded)
                            .map_err(|_| "ticket keys are not base64".to_owned())?,
                    );
                }
                _ => return Err(format!("unexpected line {line:?}")),
            }
        }
        // The tickets line comes last: without it the message was cut short.
        let ticket_keys =
            ticket_keys.ok_or("the handover message is incomplete (no tickets line)")?;
        Ok(Payload {
            listeners,
            ticket_keys,
        })
    }
}

/// The handover directory and socket; removed when dropped.
struct Rendezvous {
    dir: PathBuf,
    socket: PathBuf,
}

impl Rendezvous {
    fn create() -> Result<(Rendezvous, UnixListener), HandoverError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("lb-upgrade-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(format!("creating {}", dir.display())))?;
        let socket = dir.join("handover.sock");
        let rendezvous = Rendezvous { dir, socket };
        let listener = UnixListener::bind(&rendezvous.socket)
            .map_err(io_err(format!("binding {}", rendezvous.socket.display())))?;
        Ok((rendezvous, listener))
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The old side: starts `successor`, hands it `lb`'s listening sockets and ticket keys, and
/// returns the new process's id once it serves. On error nothing has changed here: this
/// process still accepts on every listener.
///
/// The old process, on SIGUSR2 ([`upgrade`]): binds a Unix socket in a fresh directory only
/// its user can enter, starts its [`Successor`] (the path it was started by, read anew, so a
/// replaced file or a switched symlink is the new version, with the same arguments) with the socket's path
/// in [`TAKEOVER_ENV`], and waits for it to connect. It then sends one message: the text
/// [`Payload`] (`lb-handover 1`, one `KIND ADDR` line per listening socket, the base64 ticket
/// keys) with the sockets attached in the same order. The new process ([`receive`], before it
/// starts) takes the sockets whose kind and configured address it also has, binds the others,
/// starts serving, and answers `ready PID` ([`Handback::ready`]). Only then does the old process
/// stop accepting; from the moment the new one accepts, both take connections from the same
/// queues. Until `ready`, any failure (the new process exits, say with 64 on a bad
/// configuration; it never connects; it answers nonsense; [`READY_TIMEOUT`] passes) leaves the
/// old process serving as before, and the new process, if still running, is killed.
///
/// rustix does the `sendmsg`/`recvmsg`: received descriptors arrive as `OwnedFd`, with
/// close-on-exec set, and no `unsafe` is needed here. The ticket keys travel only over this
/// socket, never to disk or a log.
pub async fn upgrade(lb: &Lb, successor: &Successor) -> Result<u32, HandoverError> {
    let (rendezvous, listener) = Rendezvous::create()?;
    let mut child = Command::new(&successor.program)
        .args(&successor.args)
        .env(TAKEOVER_ENV, &rendezvous.socket)
        .stdin(Stdio::null())
        .spawn()
        .map_err(io_err(format!("starting {}", successor.program.display())))?;
    let result = tokio::time::timeout(READY_TIMEOUT, async {
        let stream = tokio::select! {
            accepted = listener.accept() => {
                accepted.map_err(io_err("accepting the new process"))?.0
            }
            status = child.wait() => return Err(exited(status)),
        };
        send(lb, &stream).await?;
        let mut answer = String::new();
        let mut reader = BufReader::new(stream);
        tokio::select! {
            read = reader.read_line(&mut answer) => {
                read.map_err(io_err("reading the new process's answer"))?;
            }
            status = child.wait() => return Err(exited(status)),
        }
        match answer.trim_end().strip_prefix("ready ") {
            Some(pid) => pid.parse::<u32>().map_err(|_| {
                HandoverError::Protocol(format!("the new process answered {answer:?}"))
            }),
            // It closed without `ready`: it failed after receiving the sockets.
            None => Err(exited(child.wait().await)),
        }
    })
    .await
    .unwrap_or(Err(HandoverError::Timeout(READY_TIMEOUT)));
    if result.is_err() {
        stop(&mut child).await;
    }
    drop(rendezvous);
    result
}

/// Stops a failed successor (a no-op if it has exited) and reaps it.
async fn stop(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

fn exited(status: io::Result<ExitStatus>) -> HandoverError {
    match status {
        Ok(status) => HandoverError::Exited(status),
        Err(source) => HandoverError::Io {
            what: "waiting for the new process".into(),
            source,
        },
    }
}

/// Sends the handover message with the sockets attached.
async fn send(lb: &Lb, stream: &UnixStream) -> Result<(), HandoverError> {
    let ticket_keys = lb.tickets().export();
    loop {
        stream
            .writable()
            .await
            .map_err(io_err("waiting to write to the new process"))?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            lb.with_sockets(|sockets| {
                let payload = Payload {
                    listeners: sockets.iter().map(|s| (s.kind, s.configured)).collect(),
                    ticket_keys: ticket_keys.clone(),
                };
                let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.fd.as_fd()).collect();
                send_with_fds(stream, payload.encode().as_bytes(), &fds)
            })
        });
        match sent {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(io_err("sending the sockets to the new process")(e)),
        }
    }
}

/// One `sendmsg` of `bytes` with `fds` attached (SCM_RIGHTS); the whole message or an error.
fn send_with_fds(socket: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "too many sockets for one handover message",
        ));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        return Err(io::Error::other("the handover message was cut short"));
    }
    Ok(())
}

/// The new process's way back to the old one: [`Handback::ready`] once it serves.
#[derive(Debug)]
pub struct Handback {
    stream: StdUnixStream,
}

impl Handback {
    /// Tells the old process that this one serves; it then stops accepting and drains.
    pub fn ready(mut self) -> io::Result<()> {
        writeln!(self.stream, "ready {}", std::process::id())?;
        self.stream.flush()
    }
}

/// The new side, before it starts: connects to the old process at `path` (from
/// [`TAKEOVER_ENV`]) and receives its listening sockets and ticket keys. Blocking; bounded by
/// [`RECEIVE_TIMEOUT`].
pub fn receive(path: &Path) -> Result<(Inherited, Handback), HandoverError> {
    let stream = StdUnixStream::connect(path).map_err(io_err(format!(
        "could not reach the running lb at {}",
        path.display()
    )))?;
    stream
        .set_read_timeout(Some(RECEIVE_TIMEOUT))
        .map_err(io_err("setting a read timeout"))?;
    let mut bytes = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut bytes)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| {
        let e = io::Error::from(e);
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            io_err(format!(
                "the running lb sent nothing within {RECEIVE_TIMEOUT:?}"
            ))(e)
        } else {
            io_err("receiving the sockets from the running lb")(e)
        }
    })?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received_fds) = message {
            fds.extend(received_fds);
        }
    }
    let protocol = |m: String| HandoverError::Protocol(format!("from the running lb: {m}"));
    if received.flags.contains(rustix::net::ReturnFlags::CTRUNC)
        || received.flags.contains(rustix::net::ReturnFlags::TRUNC)
    {
        return Err(protocol("the handover message was truncated".into()));
    }
    let text = std::str::from_utf8(&bytes[..received.bytes])
        .map_err(|_| protocol("the handover message is not text".into()))?;
    let payload = Payload::decode(text).map_err(protocol)?;
    if payload.listeners.len() != fds.len() {
        return Err(protocol(format!(
            "{} listeners named but {} sockets attached",
            payload.listeners.len(),
            fds.len()
        )));
    }
    let sockets = payload
        .listeners
        .into_iter()
        .zip(fds)
        .map(|((kind, configured), fd)| ListeningSocket {
            kind,
            configured,
            fd,
        })
        .collect();
    Ok((
        Inherited {
            sockets,
            ticket_keys: Some(payload.ticket_keys),
        },
        Handback { stream },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_garbage_is_refused() {
        let payload = Payload {
            listeners: vec![
                (ListenerKind::Https, "127.0.0.1:0".parse().unwrap()),
                (ListenerKind::Admin, "[::1]:9100".parse().unwrap()),
            ],
            ticket_keys: vec![0, 1, 0xab, 0xff],
        };
        let text = payload.encode();
        assert_eq!(
            text,
            "lb-handover 1\nlistener https 127.0.0.1:0\nlistener admin [::1]:9100\n\
             tickets AAGr/w==\n"
        );
        assert_eq!(Payload::decode(&text).unwrap(), payload);
        for bad in [
            "",
            "lb-handover 2\n",
            "lb-handover 1\nlistener ftp 127.0.0.1:1\n",
            "lb-handover 1\nlistener https nowhere\n",
            "lb-handover 1\nlistener https\n",
            "lb-handover 1\ntickets 0g\n",
            "lb-handover 1\ntickets 012\n",
            "lb-handover 1\nsomething else\n",
            // Cut short before the tickets line, or with two of them.
            "lb-handover 1\nlistener https 127.0.0.1:1\n",
            "lb-handover 1\ntickets AAGr/w==\ntickets AAGr/w==\n",
        ] {
            assert!(Payload::decode(bad).is_err(), "{bad:?}");
        }
    }
}
