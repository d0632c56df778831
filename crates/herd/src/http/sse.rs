//! `/events`: herd's events as server-sent events, one `data:` line of JSON each (the
//! `--log-format json` object), `event:` set to its name.
//!
//! A task per client forwards from the tap (a bounded broadcast) into a small bounded body
//! channel. A client that reads slowly makes its task wait on that channel while the
//! broadcast moves on: it skips events (counted, and told with a `lagged` event) instead of
//! making herd queue them, and after [`STALL_TIMEOUT`] without reading it is cut off.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{channel::Channel, Either};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::Response;
use tokio::sync::broadcast::{self, error::RecvError};

use super::{Body, Streaming, STALL_TIMEOUT};

/// Frames queued in front of a client.
const QUEUED: usize = 16;
/// A comment this often, so a dead client is noticed and proxies keep the stream open.
const HEARTBEAT: Duration = Duration::from_secs(15);

pub(super) fn stream(
    mut events: broadcast::Receiver<Arc<str>>,
    skipped: &Rc<Cell<u64>>,
    streaming: Rc<Streaming>,
) -> Response<Body> {
    let (tx, body) = Channel::<Bytes>::new(QUEUED);
    let skipped = Rc::clone(skipped);
    tokio::task::spawn_local(async move {
        forward(&mut events, tx, &skipped).await;
        // The connection is dropped too: a client that stopped reading would never take
        // the end of the stream.
        streaming.ended.notify_one();
    });
    let mut r = Response::new(Either::Right(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Sends the stream's frames until the client goes away, stops reading for
/// [`STALL_TIMEOUT`], or herd ends.
async fn forward(
    events: &mut broadcast::Receiver<Arc<str>>,
    mut tx: http_body_util::channel::Sender<Bytes>,
    skipped: &Cell<u64>,
) {
    let mut frame = Bytes::from_static(b": herd events\n\n");
    loop {
        match tokio::time::timeout(STALL_TIMEOUT, tx.send_data(frame)).await {
            Ok(Ok(())) => {}
            // The client went away, or has not read for STALL_TIMEOUT.
            _ => return,
        }
        frame = tokio::select! {
            got = events.recv() => match got {
                Ok(frame) => Bytes::copy_from_slice(frame.as_bytes()),
                Err(RecvError::Lagged(n)) => {
                    skipped.set(skipped.get() + n);
                    Bytes::from(format!("event: lagged\ndata: {{\"skipped\":{n}}}\n\n"))
                }
                Err(RecvError::Closed) => return,
            },
            () = tokio::time::sleep(HEARTBEAT) => Bytes::from_static(b": keep-alive\n\n"),
        };
    }
}
