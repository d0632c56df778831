//! The control socket: how `herd status`, `reload`, `scale`, `logs`, … reach a running
//! supervisor.
//!
//! Each supervisor listens on `HERD_HOME/<name>.sock`, a unix stream socket that is 0600 in a
//! 0700 directory, and also checks each client's uid with `SO_PEERCRED`: only the user that
//! runs herd (or root) may talk to it. A client sends one request line and reads one response
//! line ([`herd_proto::control`]); `logs -f` keeps reading.
//!
//! The socket file is also the app's registration: `herd ls` lists the sockets in
//! `HERD_HOME`. A socket nobody answers on is stale (its supervisor died) and is removed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herd_proto::control::{Request, Response, MAX_REQUEST};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use crate::logs::Logger;
use crate::supervisor::Event;

pub fn socket_path(home: &Path, name: &str) -> PathBuf {
    home.join(format!("{name}.sock"))
}

/// Binds the control socket, refusing when a live supervisor already holds the name.
pub fn bind(home: &Path, name: &str) -> Result<std::os::unix::net::UnixListener, String> {
    let path = socket_path(home, name);
    if path.exists() {
        match StdUnixStream::connect(&path) {
            Ok(_) => {
                return Err(format!(
                    "an app named `{name}` is already running (control socket {}); stop it with `herd stop {name}` or pass another --name",
                    path.display()
                ))
            }
            Err(_) => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| format!("cannot create control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(listener)
}

/// Accepts control clients until the task is dropped.
pub async fn serve(listener: UnixListener, tx: UnboundedSender<Event>, logger: Logger) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::task::spawn_local(client(stream, tx.clone(), logger.clone()));
    }
}

/// Only the owner (or root) may control the app.
pub fn peer_allowed(peer_uid: u32, our_uid: u32) -> bool {
    peer_uid == our_uid || peer_uid == 0
}

async fn client(stream: UnixStream, tx: UnboundedSender<Event>, logger: Logger) {
    let our_uid = rustix::process::geteuid().as_raw();
    let (read, mut write) = stream.into_split();
    let allowed = match write.as_ref().peer_cred() {
        Ok(cred) => peer_allowed(cred.uid(), our_uid),
        Err(_) => false,
    };
    // The request is read even from a refused client (bounded), so that it is still reading
    // when the refusal comes and sees the reason rather than a broken pipe.
    let mut reader = TokioBufReader::new(read.take(MAX_REQUEST as u64));
    let mut line = String::new();
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    if !allowed {
        let _ = reply(
            &mut write,
            &Response::error("permission denied: this app belongs to another user"),
        )
        .await;
        return;
    }
    let request: Request = match serde_json::from_str(line.trim_end()) {
        Ok(r) => r,
        Err(e) => {
            let _ = reply(&mut write, &Response::error(format!("bad request: {e}"))).await;
            return;
        }
    };
    if let Request::Logs {
        lines,
        follow,
        instance,
    } = request
    {
        let (recent, mut rx) = logger.recent(lines, instance);
        let mut response = Response::ok("");
        response.lines = recent;
        if reply(&mut write, &response).await.is_err() || !follow {
            return;
        }
        loop {
            match rx.recv().await {
                Ok(line) if instance.is_none() || line.instance == instance => {
                    let mut text = serde_json::to_vec(&line).unwrap_or_default();
                    text.push(b'\n');
                    if write.write_all(&text).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let note = herd_proto::control::LogLine {
                        instance: None,
                        text: format!("herd: … {n} lines skipped (reader too slow)"),
                    };
                    let mut text = serde_json::to_vec(&note).unwrap_or_default();
                    text.push(b'\n');
                    if write.write_all(&text).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }
    let (done, wait) = oneshot::channel();
    if tx
        .send(Event::Control {
            request,
            reply: done,
        })
        .is_err()
    {
        let _ = reply(
            &mut write,
            &Response::error("the supervisor is shutting down"),
        )
        .await;
        return;
    }
    let response = wait
        .await
        .unwrap_or_else(|_| Response::error("the supervisor stopped before answering"));
    let _ = reply(&mut write, &response).await;
}

async fn reply(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(response).unwrap_or_default();
    text.push(b'\n');
    write.write_all(&text).await
}

/// The client side: one request, one response (blocking; the CLI needs no runtime).
pub struct Client {
    reader: BufReader<StdUnixStream>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no app named `{0}` is running (see `herd ls`)")]
    NotRunning(String),
    #[error("{0}")]
    Io(String),
}

impl Client {
    pub fn connect(home: &Path, name: &str) -> Result<Self, ClientError> {
        let path = socket_path(home, name);
        match StdUnixStream::connect(&path) {
            Ok(stream) => Ok(Client {
                reader: BufReader::new(stream),
            }),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound) => {
                Err(ClientError::NotRunning(name.into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(&path);
                Err(ClientError::NotRunning(name.into()))
            }
            Err(e) => Err(ClientError::Io(format!("{}: {e}", path.display()))),
        }
    }

    pub fn request(
        &mut self,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Response, ClientError> {
        let mut text = serde_json::to_vec(request).map_err(|e| ClientError::Io(e.to_string()))?;
        text.push(b'\n');
        let stream = self.reader.get_mut();
        stream
            .set_read_timeout(timeout)
            .map_err(|e| ClientError::Io(e.to_string()))?;
        stream
            .write_all(&text)
            .map_err(|e| ClientError::Io(format!("sending the request: {e}")))?;
        self.read_response()
    }

    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(ClientError::Io(
                "the supervisor closed the connection without answering".into(),
            )),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| ClientError::Io(format!("unreadable answer: {e}"))),
            Err(e) => Err(ClientError::Io(format!("waiting for the answer: {e}"))),
        }
    }

    /// Further lines (`logs -f`); `None` at the end.
    pub fn next_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }
}

/// Every app with a control socket in `home`, by name.
pub fn list_apps(home: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(home) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".sock"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_or_root_may_control() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
    }
}
