//! Messages from Node workers: the cluster protocol (`queryServer`, `close`, hand-off
//! replies, disconnect) and user messages (`process.send`), including broadcast.

use std::rc::Rc;

use herd_proto::event::EventName;
use herd_proto::node::{ClusterMessage, Internal, QueryServerReply};
use serde_json::{json, Value};

use super::state::WorkerState;
use super::*;
use crate::balance::{self, AcceptGate};
use crate::node::channel::{self, Answer, Ipc, IpcKind, MAX_ECHO};
use crate::node::servers;
use crate::spec::{Balance, Ready};
use crate::vocab::ServerId;

impl Supervisor {
    pub(super) fn on_ipc(&mut self, id: WorkerId, msg: Ipc) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match msg.kind {
            IpcKind::HandleAck => {
                let answer = match w.channel.as_mut() {
                    Some(c) => c.on_ack(),
                    None => return,
                };
                match answer {
                    Answer::Delivered(Some(seq)) => {
                        if let Some(f) = w.inflight.iter_mut().find(|f| f.seq == seq) {
                            f.delivered = true;
                        }
                    }
                    Answer::Unexpected => {
                        w.protocol_error("it acknowledged an fd herd did not send");
                    }
                    _ => {}
                }
                w.send(&self.tx, |c| c.flush());
            }
            IpcKind::HandleNack => {
                let answer = match w.channel.as_mut() {
                    Some(c) => c.on_nack(),
                    None => return,
                };
                match answer {
                    Answer::GaveUp(Some(seq)) => self.hand_off_failed(id, seq),
                    Answer::Unexpected => {
                        w.protocol_error("it refused an fd herd did not send");
                    }
                    _ => {}
                }
                if let Some(w) = self.workers.get_mut(&id) {
                    w.send(&self.tx, |c| c.flush());
                }
            }
            IpcKind::Reply { ack, accepted } => {
                // Only a hand-off whose fd arrived can be answered: before that, herd may
                // still send it, and acting on the answer would give the connection to two
                // workers (or close an fd a queued message is about to send).
                let Some(i) = w.inflight.iter().position(|f| f.seq == ack && f.delivered) else {
                    if w.channel.is_none() {
                        return; // Detached: what it had went elsewhere.
                    }
                    w.protocol_error(&format!(
                        "it answered hand-off {ack}, which it has not received"
                    ));
                    return;
                };
                let f = w.inflight.swap_remove(i);
                let server = f.server;
                if accepted == Some(false) && !f.probe {
                    if let Some(mut conn) = f.into_pending() {
                        conn.attempts = conn.attempts.saturating_add(1);
                        self.route_avoiding(server, conn, Some(id));
                    }
                }
                self.drain(server);
            }
            IpcKind::WorkerHandle => {
                w.send(&self.tx, |c| c.internal(&Internal::HandleAck));
            }
            IpcKind::SocketNotifyClose { key } => {
                if key.len() > MAX_ECHO {
                    w.protocol_error(&format!(
                        "NODE_SOCKET_NOTIFY_CLOSE with a {}-byte key (herd echoes at most {MAX_ECHO})",
                        key.len()
                    ));
                    return;
                }
                let reply = Internal::SocketAllClosed { key: &key };
                w.send(&self.tx, |c| c.internal(&reply));
            }
            IpcKind::SocketGetCount { key } => {
                if key.len() > MAX_ECHO {
                    w.protocol_error(&format!(
                        "NODE_SOCKET_GET_COUNT with a {}-byte key (herd echoes at most {MAX_ECHO})",
                        key.len()
                    ));
                    return;
                }
                let reply = Internal::SocketCount {
                    key: &key,
                    count: 0,
                };
                w.send(&self.tx, |c| c.internal(&reply));
            }
            IpcKind::Online => {
                // Node says it once, before it listens; a late or repeated one changes nothing.
                if matches!(w.state(), WorkerState::Starting { .. }) {
                    w.set_state(WorkerState::Online {
                        since: tokio::time::Instant::now(),
                    });
                }
                let who = w.who();
                self.logger
                    .event(EventName::Online, Some(who), "online", &[]);
            }
            IpcKind::ExitedAfterDisconnect { seq } => {
                // The worker is leaving on its own (cluster.worker.disconnect()/kill()) and
                // waits for this ack before it goes. It gets no new connections; its exit
                // restarts the slot like any other, so the app keeps N workers.
                if let Some(next) = w.state().on_leaving(tokio::time::Instant::now()) {
                    w.set_state(next);
                }
                w.send(&self.tx, |c| c.cluster(&ClusterMessage::Ack { ack: seq }));
                let who = w.who();
                self.logger.event(
                    EventName::Disconnecting,
                    Some(who),
                    "is disconnecting on its own",
                    &[],
                );
            }
            IpcKind::QueryServer(query) => self.query_server(id, *query),
            IpcKind::BadQueryServer { seq, detail } => {
                let who = w.who();
                self.logger.event(
                    EventName::ListenError,
                    Some(who),
                    &format!("cannot listen: herd cannot read this listen() request ({detail}); answering EINVAL"),
                    &[],
                );
                if let Some(seq) = seq {
                    let reply = ClusterMessage::QueryServer(QueryServerReply::invalid(seq));
                    w.send(&self.tx, |c| c.cluster(&reply));
                }
            }
            IpcKind::Listening => {
                if self.plan.ready == Ready::Listening {
                    self.mark_ready(id, "listening");
                }
            }
            IpcKind::Close { key } => self.server_closed_by(id, &key),
            IpcKind::User(text) => self.user_message(id, text),
            IpcKind::Garbage(error) => {
                let who = w.who();
                self.logger.event(
                    EventName::IpcError,
                    Some(who),
                    &format!("sent something herd cannot read, ignored: {error}"),
                    &[],
                );
            }
        }
    }

    pub(super) fn user_message(&mut self, id: WorkerId, text: String) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let who = w.who();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if value == json!("ready") && self.plan.ready == Ready::Message {
            self.mark_ready(id, "message");
            return;
        }
        match value.get("herd").and_then(Value::as_str) {
            Some("unready") => {
                let reason = value.get("reason").and_then(Value::as_str).unwrap_or("");
                return self.declared_unready(id, reason);
            }
            Some("ready") => return self.declared_ready(id),
            _ => {}
        }
        if value.get("herd").and_then(Value::as_str) == Some("broadcast") {
            let data = value.get("data").unwrap_or(&Value::Null);
            let line = match channel::user_line(data) {
                Ok(line) => line,
                Err(why) => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.protocol_error(&format!("broadcast refused: {why}"));
                    }
                    return;
                }
            };
            let others: Vec<WorkerId> = self.workers.keys().copied().filter(|&o| o != id).collect();
            let mut sent = 0;
            for other in &others {
                if let Some(o) = self.workers.get_mut(other) {
                    if o.send(&self.tx, |c| c.user(std::rc::Rc::clone(&line))) {
                        sent += 1;
                    }
                }
            }
            // The event says how much, not what: a payload may be a megabyte.
            let bytes = line.len() - 1;
            self.logger.event(
                EventName::Broadcast,
                Some(who),
                &format!(
                    "broadcast {bytes} bytes to {sent} of {} workers",
                    others.len()
                ),
                &[("bytes", json!(bytes)), ("workers", json!(sent))],
            );
            return;
        }
        let bytes = text.len();
        let (shown, data) = if bytes > 1000 {
            let cut = format!(
                "{}… ({bytes} bytes)",
                &text[..text.floor_char_boundary(1000)]
            );
            (cut, Value::Null)
        } else {
            (text, value)
        };
        self.logger.event(
            EventName::Message,
            Some(who),
            &format!("message: {shown}"),
            &[("data", data), ("bytes", json!(bytes))],
        );
    }

    /// A hand-off the worker NACKed past the limit: it never got the fd. The connection goes
    /// to another worker (or, refused everywhere, is closed), never stays in flight.
    fn hand_off_failed(&mut self, id: WorkerId, seq: u64) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(i) = w.inflight.iter().position(|f| f.seq == seq) else {
            return;
        };
        let f = w.inflight.swap_remove(i);
        if let Some(n) = w.given_up.note() {
            let total = w.given_up.total;
            let who = w.who();
            self.logger.event(
                EventName::HandoffFailed,
                Some(who),
                &format!(
                    "it refused {n} connection(s) {} times (NACK); they go to another worker; {total} so far",
                    channel::MAX_NACKS + 1
                ),
                &[("failed", json!(total))],
            );
        }
        let server = f.server;
        if !f.probe {
            if let Some(mut conn) = f.into_pending() {
                conn.attempts = conn.attempts.saturating_add(1);
                self.route_avoiding(server, conn, Some(id));
            }
        }
        self.drain(server);
    }

    pub(super) fn query_server(&mut self, id: WorkerId, query: herd_proto::node::QueryServer) {
        let key = query.key();
        let data_len = query.data.as_ref().map_or(0, |d| d.get().len());
        if key.len() > MAX_ECHO || data_len > MAX_ECHO {
            // Its reply would echo them (to every worker, for `data`): refuse it unechoed.
            if let Some(w) = self.workers.get_mut(&id) {
                let who = w.who();
                self.logger.event(
                    EventName::ListenError,
                    Some(who),
                    &format!("cannot listen: its listen() request has a {}-byte key and {data_len}-byte data (herd echoes at most {MAX_ECHO}); answering EINVAL", key.len()),
                    &[],
                );
                let reply = ClusterMessage::QueryServer(QueryServerReply::invalid(query.seq));
                w.send(&self.tx, |c| c.cluster(&reply));
            }
            return;
        }
        if let Some(server) = self.servers.by_key(&key) {
            self.attach(id, server, &query);
            return;
        }
        if self.servers.is_binding(&key) {
            if let Err(query) = self.servers.add_waiter(&key, id, query) {
                let busy = format!("too many listen() calls wait for {key}");
                self.refuse_listen(id, &query, (-libc::EAGAIN, busy));
            }
            return;
        }
        if self.servers.len() >= servers::MAX_SERVERS {
            let full = format!(
                "the app already has {} servers, herd's limit",
                servers::MAX_SERVERS
            );
            self.refuse_listen(id, &query, (-libc::EMFILE, full));
            return;
        }
        let slots = self.slots.len().max(self.plan.instances);
        // Hash and sticky cost a descriptor per slot for each server: bounded in descriptors.
        if self.plan.balance.per_slot()
            && self.servers.sockets() + slots > servers::MAX_SLOT_SOCKETS
        {
            let full = format!(
                "the app's servers already hold {} sockets ({slots} per server, one per worker slot); herd's limit is {}",
                self.servers.sockets(),
                servers::MAX_SLOT_SOCKETS
            );
            self.refuse_listen(id, &query, (-libc::EMFILE, full));
            return;
        }
        let user = self.plan.user.as_ref();
        match servers::bind_for(&query, self.plan.balance, &self.plan.listeners, user, slots) {
            servers::Step::Now(Ok(bound)) => {
                let server = self.add_server(&query, bound);
                self.attach(id, server, &query);
            }
            servers::Step::Now(Err(e)) => self.refuse_listen(id, &query, e),
            servers::Step::Unix { path, mode } => {
                let tx = self.tx.clone();
                let done_key = key.clone();
                let done = move || {
                    let _ = tx.send(Event::UnixBound { key: done_key });
                };
                let creds = servers::creds_of(user);
                // A unix path has no reuseport group: hash and sticky share one socket.
                let balance = match self.plan.balance {
                    b if b.per_slot() => Balance::Shared,
                    b => b,
                };
                if let Err(query) = self
                    .servers
                    .start_bind(key, id, query, path, mode, balance, creds, done)
                {
                    let busy = format!(
                        "too many unix-socket listen() calls under way (at most {})",
                        servers::MAX_BINDS
                    );
                    self.refuse_listen(id, &query, (-libc::EAGAIN, busy));
                }
            }
        }
    }

    /// A unix bind started by [`Supervisor::query_server`] is done: answer every query that
    /// waited for it.
    pub(super) fn unix_bound(&mut self, key: String) {
        let Some((waiters, result)) = self.servers.finish_bind(&key) else {
            return;
        };
        match result {
            Ok(bound) => {
                let Some((_, first)) = waiters.first() else {
                    return;
                };
                let server = self.add_server(first, bound);
                for (id, query) in &waiters {
                    self.attach(*id, server, query);
                }
            }
            Err(e) => {
                for (id, query) in &waiters {
                    self.refuse_listen(*id, query, e.clone());
                }
            }
        }
    }

    fn add_server(
        &mut self,
        query: &herd_proto::node::QueryServer,
        bound: servers::Bound,
    ) -> ServerId {
        let server = servers::new_server(query, bound);
        let display = server.display.clone();
        let mode = server.mode;
        let s = self.servers.insert(server);
        self.logger.event(
            EventName::Bound,
            None,
            &format!("listening on {display} ({mode})"),
            &[
                ("address", json!(display)),
                ("balance", json!(mode.to_string())),
            ],
        );
        if mode == Balance::RoundRobin {
            self.start_accepting(s);
        }
        s
    }

    fn refuse_listen(
        &mut self,
        id: WorkerId,
        query: &herd_proto::node::QueryServer,
        (errno, problem): (i32, String),
    ) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let who = w.who();
        self.logger.event(
            EventName::ListenError,
            Some(who),
            &format!("cannot listen: {problem}"),
            &[("errno", json!(errno))],
        );
        let key = query.key();
        let reply = QueryServerReply::refused(errno, &key, query.seq, query.data.as_deref());
        let reply = ClusterMessage::QueryServer(reply);
        w.send(&self.tx, |c| c.cluster(&reply));
    }

    /// Gives worker `id` the server, and answers its query.
    fn attach(&mut self, id: WorkerId, server: ServerId, query: &herd_proto::node::QueryServer) {
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if !s.workers.contains(&id) {
            s.workers.push(id);
        }
        if !w.servers.contains(&server) {
            w.servers.push(server);
        }
        // Hash and sticky: the worker's own slot's socket, with the shared-handle answer.
        let slot_socket = match (s.mode, &s.group) {
            (Balance::RoundRobin, _) | (_, None) => None,
            (_, Some(group)) => match kernel::slot_socket(group, w.instance) {
                Ok(socket) => Some(socket),
                Err(e) => {
                    let problem = format!("cannot add a socket for slot {}: {e}", w.instance);
                    let errno = -e.raw_os_error().unwrap_or(libc::EADDRINUSE);
                    s.workers.retain(|&x| x != id);
                    w.servers.retain(|&x| x != server);
                    self.refuse_listen(id, query, (errno, problem));
                    return;
                }
            },
        };
        let reply = ClusterMessage::QueryServer(s.reply(query.seq));
        match s.mode {
            Balance::RoundRobin => {
                w.send(&self.tx, |c| c.cluster(&reply));
            }
            _ => {
                let socket = slot_socket.unwrap_or_else(|| Rc::clone(&s.socket));
                w.send(&self.tx, |c| c.cluster_with_fd(&reply, socket));
            }
        }
        self.drain(server);
    }

    pub(super) fn start_accepting(&mut self, server: ServerId) {
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let gate = Rc::new(AcceptGate::default());
        s.gate = Some(Rc::clone(&gate));
        s.accept_task = Some(tokio::task::spawn_local(balance::accept_loop(
            server,
            Rc::clone(&s.socket),
            gate,
            self.tx.clone(),
        )));
    }

    pub(super) fn server_closed_by(&mut self, id: WorkerId, key: &str) {
        let Some(server) = self.servers.by_key(key) else {
            return;
        };
        let stopping = self
            .workers
            .get(&id)
            .is_none_or(|w| w.state().is_draining());
        if let Some(w) = self.workers.get_mut(&id) {
            w.servers.retain(|&s| s != server);
        }
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        s.workers.retain(|&w| w != id);
        // The app closed this server on purpose (not a worker going away): once no worker
        // holds it, herd closes it too.
        if !stopping && s.workers.is_empty() && !s.from_cli {
            if let Some(display) = self.servers.close(server) {
                self.logger.event(
                    EventName::Closed,
                    None,
                    &format!("closed {display} (the app closed it)"),
                    &[],
                );
            }
        }
    }
}
