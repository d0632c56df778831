//! Properties of the control protocol's parsing: whatever bytes a client sends, framing and
//! parsing answer (never panic), keep at most `MAX_REQUEST` bytes, and every request the CLI
//! can send comes back as itself.

use herd_proto::control::{
    frame, parse_request, Frame, LogLine, Request, RequestError, Response, MAX_REQUEST,
};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        ".*".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Status),
        any::<usize>().prop_map(|parallel| Request::Reload { parallel }),
        Just(Request::Restart),
        ".*".prop_map(|to| Request::Scale { to }),
        Just(Request::Stop),
        (any::<usize>(), any::<bool>(), any::<Option<usize>>()).prop_map(
            |(lines, follow, instance)| Request::Logs {
                lines,
                follow,
                instance
            }
        ),
        (json_value(), any::<Option<usize>>())
            .prop_map(|(data, instance)| Request::Send { data, instance }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes, at any point of the stream: framing and parsing answer.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), eof: bool) {
        match frame(&bytes, eof) {
            Frame::Line(line) => {
                prop_assert!(!line.contains(&b'\n'));
                prop_assert!(bytes.starts_with(line));
                let _ = parse_request(line);
            }
            Frame::Incomplete => prop_assert!(!eof && !bytes.contains(&b'\n')),
            Frame::TooLong => prop_assert!(bytes.len() >= MAX_REQUEST),
        }
        let _ = parse_request(&bytes);
    }

    /// Near-JSON (a valid request with bytes changed) is parsed or refused, never panics,
    /// and a refusal says it is a bad request.
    #[test]
    fn mangled_requests_are_refused_in_words(
        req in request(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = serde_json::to_vec(&req).expect("json");
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if let Err(e) = parse_request(&bytes) {
            prop_assert!(e.to_string().starts_with("bad request"), "{e}");
        }
    }

    /// What the CLI sends is framed as one line and parsed back as itself, whatever follows.
    #[test]
    fn requests_round_trip(req in request(), after in prop::collection::vec(any::<u8>(), 0..64), crlf: bool) {
        let mut wire = serde_json::to_vec(&req).expect("json");
        if crlf {
            wire.push(b'\r');
        }
        wire.push(b'\n');
        let len = wire.len();
        wire.extend_from_slice(&after);
        let Frame::Line(line) = frame(&wire, false) else {
            return Err(TestCaseError::fail("a whole line is framed"));
        };
        prop_assert_eq!(line.len(), len - 1);
        prop_assert_eq!(parse_request(line), Ok(req));
    }

    /// Responses (what `herd logs` assembles by hand included) read back as themselves.
    #[test]
    fn responses_round_trip(ok: bool, message in ".*", lines in prop::collection::vec((any::<Option<usize>>(), ".*"), 0..4)) {
        let mut response = if ok { Response::ok(message) } else { Response::error(message) };
        response.lines = lines
            .into_iter()
            .map(|(instance, text)| LogLine { instance, text })
            .collect();
        let text = serde_json::to_string(&response).expect("json");
        prop_assert!(!text.contains('\n'));
        let back: Response = serde_json::from_str(&text).expect("parse");
        prop_assert_eq!(back, response);
    }

    /// A request is bounded: without a newline in the first MAX_REQUEST bytes it is refused
    /// as too long, whatever comes after.
    #[test]
    fn overlong_requests_are_refused(fill in any::<u8>().prop_filter("no newline", |b| *b != b'\n'), extra in 0usize..64, eof: bool) {
        let bytes = vec![fill; MAX_REQUEST + extra];
        prop_assert_eq!(frame(&bytes, eof), Frame::TooLong);
        prop_assert_eq!(parse_request(&bytes), Err(RequestError::TooLong));
    }
}
