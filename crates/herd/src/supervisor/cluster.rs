//! Messages from Node workers: the cluster protocol (`queryServer`, `close`, hand-off
//! replies, disconnect) and user messages (`process.send`), including broadcast.

use std::os::fd::AsFd;
use std::rc::Rc;

use serde_json::{json, Value};

use super::*;
use crate::balance::{self, AcceptGate};
use crate::node::channel::Ipc;
use crate::node::servers::{self, ServerId};
use crate::spec::{Balance, Ready};

impl Supervisor {
    pub(super) fn on_ipc(&mut self, id: WorkerId, msg: Ipc) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match msg {
            Ipc::HandleAck => {
                w.send(&self.tx, |c| c.on_ack());
            }
            Ipc::HandleNack => {
                w.send(&self.tx, |c| c.on_nack());
            }
            Ipc::Reply { ack, accepted } => {
                let Some(i) = w.inflight.iter().position(|f| f.seq == ack) else {
                    return;
                };
                let f = w.inflight.swap_remove(i);
                if accepted == Some(false) && !f.conn.probe {
                    let mut conn = f.conn;
                    conn.attempts += 1;
                    self.route_avoiding(f.server, conn, Some(id));
                }
                self.drain(f.server);
            }
            Ipc::WorkerHandle => {
                w.send(&self.tx, |c| c.line(r#"{"cmd":"NODE_HANDLE_ACK"}"#));
            }
            Ipc::SocketNotifyClose { key } => {
                let line = format!(
                    r#"{{"cmd":"NODE_SOCKET_ALL_CLOSED","key":{}}}"#,
                    herd_proto::node::quote(&key)
                );
                w.send(&self.tx, |c| c.line(&line));
            }
            Ipc::SocketGetCount { key } => {
                let line = format!(
                    r#"{{"cmd":"NODE_SOCKET_COUNT","key":{},"count":0}}"#,
                    herd_proto::node::quote(&key)
                );
                w.send(&self.tx, |c| c.line(&line));
            }
            Ipc::Online => {
                w.online = true;
                let who = w.who();
                self.logger.event("online", Some(who), "online", &[]);
            }
            Ipc::ExitedAfterDisconnect { seq } => {
                // The worker is leaving on its own (cluster.worker.disconnect()/kill()) and
                // waits for this ack before it goes. It gets no new connections; its exit
                // restarts the slot like any other, so the app keeps N workers.
                w.leaving = true;
                let fields = format!(r#""ack":{seq}"#);
                w.send(&self.tx, |c| c.cluster(&fields));
                let who = w.who();
                self.logger.event(
                    "disconnecting",
                    Some(who),
                    "is disconnecting on its own",
                    &[],
                );
            }
            Ipc::QueryServer(query) => self.query_server(id, *query),
            Ipc::BadQueryServer { seq, detail } => {
                let who = w.who();
                self.logger.event(
                    "listen_error",
                    Some(who),
                    &format!("cannot listen: herd cannot read this listen() request ({detail}); answering EINVAL"),
                    &[],
                );
                if let Some(seq) = seq {
                    let fields = format!(
                        r#""errno":{},"key":"herd:invalid:{seq}","ack":{seq},"data":null"#,
                        -libc::EINVAL
                    );
                    w.send(&self.tx, |c| c.cluster(&fields));
                }
            }
            Ipc::Listening => {
                if self.plan.ready == Ready::Listening {
                    self.mark_ready(id, "listening");
                }
            }
            Ipc::Close { key } => self.server_closed_by(id, &key),
            Ipc::User(text) => self.user_message(id, text),
            Ipc::Garbage(error) => {
                let who = w.who();
                self.logger.event(
                    "ipc_error",
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
        if value.get("herd").and_then(Value::as_str) == Some("broadcast") {
            let data = value.get("data").cloned().unwrap_or(Value::Null);
            let line = data.to_string();
            let others: Vec<WorkerId> = self.workers.keys().copied().filter(|&o| o != id).collect();
            for other in &others {
                if let Some(o) = self.workers.get_mut(other) {
                    o.send(&self.tx, |c| c.line(&line));
                }
            }
            self.logger.event(
                "broadcast",
                Some(who),
                &format!("broadcast to {} workers: {line}", others.len()),
                &[("data", data)],
            );
            return;
        }
        let shown = if text.len() > 1000 {
            format!("{}…", &text[..text.floor_char_boundary(1000)])
        } else {
            text
        };
        self.logger.event(
            "message",
            Some(who),
            &format!("message: {shown}"),
            &[("data", value)],
        );
    }

    pub(super) fn query_server(&mut self, id: WorkerId, query: herd_proto::node::QueryServer) {
        let key = query.key();
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
        let user = self.plan.user.as_ref();
        match servers::bind_for(&query, self.plan.balance, &self.plan.listeners, user) {
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
                let balance = self.plan.balance;
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
            "bound",
            None,
            &format!("listening on {display} ({mode})"),
            &[
                ("address", json!(display)),
                ("balance", json!(mode.to_string())),
            ],
        );
        if mode != Balance::Shared {
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
            "listen_error",
            Some(who),
            &format!("cannot listen: {problem}"),
            &[("errno", json!(errno))],
        );
        let data = query.data.as_ref().map_or("null", |d| d.get());
        let fields = format!(
            r#""errno":{errno},"key":{},"ack":{},"data":{data}"#,
            herd_proto::node::quote(&query.key()),
            query.seq
        );
        w.send(&self.tx, |c| c.cluster(&fields));
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
        let fields = s.reply_fields(query.seq);
        match s.mode {
            Balance::Shared => {
                let socket = Rc::clone(&s.socket);
                w.send(&self.tx, |c| c.cluster_with_fd(&fields, socket.as_fd()));
            }
            Balance::RoundRobin | Balance::Sticky => {
                w.send(&self.tx, |c| c.cluster(&fields));
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
        let stopping = self.workers.get(&id).is_none_or(|w| w.stopping);
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
                    "closed",
                    None,
                    &format!("closed {display} (the app closed it)"),
                    &[],
                );
            }
        }
    }
}
