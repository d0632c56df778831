//! Properties of the Node IPC parser: whatever a worker writes, [`Lines`] and [`parse`]
//! never panic, never hold more than their limit, and read back what herd encodes; and of
//! herd's own messages: each is one JSON object line that Node takes for its own.

use std::net::SocketAddr;

use herd_proto::node::{
    encode_cluster_message, encode_handle_message, encode_internal, encode_newconn, encode_user,
    is_internal, parse, quote, ClusterMessage, Internal, Lines, Message, ProtoError,
    QueryServerReply, Sockname,
};
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::Value;

const LIMIT: usize = 256;

/// Feeds `chunks` through a [`Lines`] with [`LIMIT`], parsing each line. Returns the lines,
/// or stops at the first framing error.
fn feed(chunks: &[Vec<u8>]) -> (Vec<Vec<u8>>, Option<ProtoError>) {
    let mut lines = Lines::with_limit(LIMIT);
    let mut out = Vec::new();
    for chunk in chunks {
        let spare = lines.spare(chunk.len().max(1));
        let len = spare.len();
        spare[..chunk.len()].copy_from_slice(chunk);
        lines.filled(len, chunk.len());
        loop {
            match lines.next_line() {
                Ok(Some(line)) => {
                    let _ = parse(line);
                    out.push(line.to_vec());
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        // Without a newline in sight, herd never holds more than the limit.
        assert!(lines.pending() <= LIMIT, "{} bytes held", lines.pending());
    }
    (out, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..20),
    ) {
        let _ = feed(&chunks);
        for chunk in &chunks {
            let _ = parse(chunk);
        }
    }

    #[test]
    fn json_looking_lines_never_panic(
        text in r#"\{("(cmd|act|key|seq|ack|accepted|msg|data|address|port|addressType|fd|index)":(null|true|false|-?[0-9]{1,20}|"NODE_[A-Z_]{0,20}"|"[a-zA-Z]{0,8}"|\{\}|\[\]),?){0,8}\}"#,
    ) {
        let _ = parse(text.as_bytes());
    }

    #[test]
    fn a_line_over_the_limit_is_an_error_not_growth(
        extra in 1usize..1000,
        split in 1usize..50,
        newline in any::<bool>(),
    ) {
        let mut bytes = vec![b'x'; LIMIT + extra];
        if newline {
            bytes.push(b'\n');
        }
        let chunks: Vec<Vec<u8>> = bytes.chunks(split).map(<[u8]>::to_vec).collect();
        let (lines, err) = feed(&chunks);
        prop_assert!(lines.is_empty());
        prop_assert_eq!(err, Some(ProtoError::LineTooLong));
    }

    #[test]
    fn lines_split_anywhere_come_back_whole(
        msgs in prop::collection::vec("[ -~]{0,60}", 1..10),
        cut in prop::collection::vec(1usize..40, 1..40),
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(|m| m.bytes().chain([b'\n'])).collect();
        let mut chunks = Vec::new();
        let mut at = 0;
        for c in cut.iter().cycle() {
            if at >= stream.len() {
                break;
            }
            let end = (at + c).min(stream.len());
            chunks.push(stream[at..end].to_vec());
            at = end;
        }
        let (lines, err) = feed(&chunks);
        prop_assert_eq!(err, None);
        let want: Vec<Vec<u8>> = msgs.iter().map(|m| m.as_bytes().to_vec()).collect();
        prop_assert_eq!(lines, want);
    }

    #[test]
    fn worker_replies_parse_back(ack in 0u64..1 << 53, seq in 0..i64::MAX as u64, accepted in any::<bool>()) {
        let line = format!(r#"{{"cmd":"NODE_CLUSTER","ack":{ack},"accepted":{accepted},"seq":{seq}}}"#);
        prop_assert_eq!(
            parse(line.as_bytes()),
            Ok(Message::Reply { ack: ack as i64, accepted: Some(accepted) })
        );
    }

    #[test]
    fn a_message_node_takes_for_its_own_is_never_a_user_message(
        cmd in "NODE_[A-Z_]{1,12}",
        seq in any::<u64>(),
        // A second `cmd` would win in Node's JSON.parse too (the last key wins), and a `cmd`
        // that is not a string makes the message a user one there as here.
        extra in "[a-z]{0,6}".prop_filter("a key other than cmd", |k| k != "cmd"),
    ) {
        let line = format!(r#"{{"cmd":"{cmd}","seq":{seq},"{extra}":[1]}}"#);
        let user = matches!(parse(line.as_bytes()), Ok(Message::User(_)));
        prop_assert!(!user, "{}", line);
    }

    #[test]
    fn encoded_hand_offs_parse_back(key in "\\PC{0,40}", seq in any::<u64>()) {
        let mut out = Vec::new();
        encode_newconn(&mut out, &quote(&key), seq);
        prop_assert_eq!(out.pop(), Some(b'\n'));
        prop_assert!(!out.contains(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        prop_assert_eq!(&v["msg"]["key"], &serde_json::Value::String(key));
        prop_assert_eq!(v["msg"]["seq"].as_u64(), Some(seq));
        let handle = matches!(parse(&out), Ok(Message::Handle { .. }));
        prop_assert!(handle);
    }

    #[test]
    fn every_message_herd_builds_is_a_node_internal_json_line(
        pick in 0usize..9,
        key in "\\PC{0,40}",
        ack in any::<i64>(),
        // herd's parser reads `seq` as an i64; herd's counter starts at 0 and never gets near.
        seq in 0..=i64::MAX as u64,
        errno in any::<i32>(),
        data in prop::option::of("\\PC{0,20}"),
        addr in any::<SocketAddr>(),
        count in any::<u64>(),
    ) {
        let data: Option<Box<RawValue>> = data.map(|d| {
            let text = serde_json::json!({"ticketKeys": d}).to_string();
            RawValue::from_string(text).expect("raw JSON")
        });
        let data = data.as_deref();
        let sockname = Sockname::from(addr);
        let replies = [
            QueryServerReply::shared(&key, ack, data),
            QueryServerReply::round_robin(&key, ack, data, Some(&sockname)),
            QueryServerReply::round_robin(&key, ack, data, None),
            QueryServerReply::refused(errno, &key, ack, data),
            QueryServerReply::invalid(ack),
        ];
        let mut out = Vec::new();
        match pick {
            0..=4 => {
                let reply = replies[pick].clone();
                let shared = pick == 0;
                let msg = ClusterMessage::QueryServer(reply.clone());
                let v = if shared {
                    encode_handle_message(&mut out, &msg, seq);
                    let wrapper = one_internal_line(&out)?;
                    prop_assert_eq!(&wrapper["cmd"], "NODE_HANDLE");
                    prop_assert_eq!(&wrapper["type"], "net.Native");
                    let Ok(Message::Handle { inner }) = parse(&out[..out.len() - 1]) else {
                        return Err(TestCaseError::fail("not read back as NODE_HANDLE"));
                    };
                    prop_assert_eq!(
                        parse(inner.as_bytes()),
                        Ok(Message::Reply { ack: reply.ack, accepted: None })
                    );
                    wrapper["msg"].clone()
                } else {
                    encode_cluster_message(&mut out, &msg, seq);
                    prop_assert_eq!(
                        parse(&out[..out.len() - 1]),
                        Ok(Message::Reply { ack: reply.ack, accepted: None })
                    );
                    one_internal_line(&out)?
                };
                prop_assert_eq!(&v["cmd"], "NODE_CLUSTER");
                prop_assert_eq!(v["seq"].as_u64(), Some(seq));
                // `errno` is always there: 0 (shared), null (round-robin) or the error.
                let want_errno = reply.errno.map_or(Value::Null, Value::from);
                prop_assert_eq!(v.get("errno"), Some(&want_errno));
                prop_assert_eq!(v["key"].as_str(), Some(&*reply.key));
                prop_assert_eq!(v["ack"].as_i64(), Some(reply.ack));
                let want_data: Value = reply
                    .data
                    .map_or(Value::Null, |d| serde_json::from_str(d.get()).expect("json"));
                prop_assert_eq!(v.get("data"), Some(&want_data));
                match reply.sockname {
                    Some(s) => {
                        prop_assert_eq!(v["sockname"]["address"].as_str(), Some(s.address.as_str()));
                        let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                        prop_assert_eq!(&v["sockname"]["family"], family);
                        prop_assert_eq!(v["sockname"]["port"].as_u64(), Some(u64::from(addr.port())));
                    }
                    None => prop_assert!(v.get("sockname").is_none()),
                }
            }
            5 | 6 => {
                let msg = if pick == 5 {
                    ClusterMessage::Ack { ack }
                } else {
                    ClusterMessage::DISCONNECT
                };
                encode_cluster_message(&mut out, &msg, seq);
                let v = one_internal_line(&out)?;
                prop_assert_eq!(&v["cmd"], "NODE_CLUSTER");
                prop_assert_eq!(v["seq"].as_u64(), Some(seq));
            }
            _ => {
                let msg = match pick {
                    7 => Internal::SocketAllClosed { key: &key },
                    _ => Internal::SocketCount { key: &key, count },
                };
                encode_internal(&mut out, &msg);
                let v = one_internal_line(&out)?;
                prop_assert_eq!(v["key"].as_str(), Some(key.as_str()));
                prop_assert_eq!(
                    parse(&out[..out.len() - 1]),
                    Ok(Message::OtherInternal)
                );
            }
        }
    }

    #[test]
    fn user_messages_round_trip_unless_node_would_take_them(
        s in "\\PC{0,40}",
        n in any::<i64>(),
        cmd in prop::option::of("(NODE_)?[A-Za-z_]{0,10}"),
    ) {
        let mut value = serde_json::json!({"s": s, "n": n});
        if let Some(cmd) = &cmd {
            value["cmd"] = serde_json::Value::String(cmd.clone());
        }
        let text = value.to_string();
        let mut out = Vec::new();
        encode_user(&mut out, &text);
        out.pop();
        let parsed = parse(&out);
        let internal = cmd.as_deref().is_some_and(|c| c.starts_with("NODE_"));
        prop_assert_eq!(is_internal(&value), internal);
        if !internal {
            prop_assert_eq!(parsed, Ok(Message::User(text.as_str())));
        } else if cmd.as_deref().is_some_and(|c| c.len() > 5) {
            let user = matches!(parsed, Ok(Message::User(_)));
            prop_assert!(!user);
        }
    }
}

/// `line` is exactly one `\n`-terminated JSON object that Node takes for one of its own
/// (`cmd` a string starting `NODE_`, longer than the prefix), and herd's parser does not
/// take it for a user message. Returns the object.
fn one_internal_line(line: &[u8]) -> Result<Value, TestCaseError> {
    prop_assert_eq!(line.last(), Some(&b'\n'));
    let body = &line[..line.len() - 1];
    prop_assert!(!body.contains(&b'\n'), "one line");
    let v: Value =
        serde_json::from_slice(body).map_err(|e| TestCaseError::fail(format!("not JSON: {e}")))?;
    prop_assert!(v.is_object());
    prop_assert!(is_internal(&v));
    let cmd = v["cmd"].as_str().unwrap_or_default();
    prop_assert!(cmd.len() > "NODE_".len(), "{}", cmd);
    let user = matches!(parse(body), Ok(Message::User(_)) | Err(_));
    prop_assert!(!user, "read back as a message of its own");
    Ok(v)
}
