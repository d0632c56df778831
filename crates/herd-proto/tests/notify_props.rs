//! Properties of the notify datagram parser and encoder (`herd_proto::notify`): whatever a
//! worker (or anyone who reaches its socket) sends, parsing never panics and stays within
//! the datagram limit; what herd's own encoder writes parses back to the same messages.

use herd_proto::notify::{encode, parse, parse_line, DatagramError, Message, MAX_DATAGRAM};
use proptest::prelude::*;

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        Just(Message::Ready),
        Just(Message::Watchdog),
        Just(Message::Stopping),
        Just(Message::Reloading),
        // Status text without control characters round-trips exactly (the encoder turns
        // control characters into spaces, checked separately below).
        "[^\\p{Cc}]{0,60}".prop_map(Message::Status),
        (1u32..=u32::MAX).prop_map(Message::MainPid),
        (0i32..=i32::MAX).prop_map(Message::Errno),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let parsed = parse(&bytes).expect("under the limit");
        // Each non-empty line yields at most one message or one complaint.
        let lines = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
        prop_assert!(parsed.messages.len() + parsed.malformed.len() <= lines);
        for m in &parsed.malformed {
            prop_assert!(m.line.len() <= 80 * 3, "excerpt bounded: {}", m.line.len());
            prop_assert!(m.line_no >= 1);
        }
    }

    #[test]
    fn key_shaped_lines_never_panic(
        key in prop_oneof![
            Just("READY"), Just("WATCHDOG"), Just("STOPPING"), Just("RELOADING"),
            Just("STATUS"), Just("MAINPID"), Just("ERRNO"), Just("FDSTORE"),
        ],
        value in "\\PC{0,30}",
    ) {
        let line = format!("{key}={value}");
        let _ = parse_line(line.as_bytes());
        let _ = parse(line.as_bytes());
    }

    #[test]
    fn encode_then_parse_round_trips(messages in proptest::collection::vec(message(), 0..20)) {
        let datagram = encode(&messages).expect("small enough");
        let parsed = parse(datagram.as_bytes()).expect("within bounds");
        prop_assert!(parsed.malformed.is_empty(), "{:?}", parsed.malformed);
        // An empty STATUS= line is kept; nothing else is lost or added.
        prop_assert_eq!(parsed.messages, messages);
    }

    #[test]
    fn status_text_stays_on_one_line(text in "\\PC{0,40}[\\n\\r\\t]\\PC{0,40}") {
        let datagram = encode(&[Message::Status(text.clone()), Message::Ready]).expect("small");
        let parsed = parse(datagram.as_bytes()).expect("within bounds");
        prop_assert_eq!(parsed.messages.len(), 2);
        prop_assert_eq!(&parsed.messages[1], &Message::Ready);
    }

    #[test]
    fn oversize_datagrams_are_errors(extra in 1usize..2048, fill in any::<u8>()) {
        let big = vec![fill; MAX_DATAGRAM + extra];
        prop_assert_eq!(
            parse(&big),
            Err(DatagramError::TooLarge { len: MAX_DATAGRAM + extra, max: MAX_DATAGRAM })
        );
        let long_status = Message::Status("x".repeat(MAX_DATAGRAM + extra));
        let refused = matches!(encode(&[long_status]), Err(DatagramError::TooLarge { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn datagrams_at_the_limit_are_accepted(fill in any::<u8>()) {
        prop_assert!(parse(&vec![fill; MAX_DATAGRAM]).is_ok());
    }
}
