//! The SSH agent front end's reading of a message body: whatever it accepts
//! is exactly one request (a byte more is refused), and the request it read,
//! encoded again, reads the same.
//!
//! Input: one message body (the length prefix already off).

use hsmd::server::agent::message::{parse, Message};
use ssh_agent_lib::{
    proto::{Extension, Request},
    ssh_encoding::Encode as _,
};

/// Reads the input as one agent message.
pub fn run(data: &[u8]) {
    let Ok(message) = parse(data) else { return };
    // (An unknown extension's details are opaque: a byte more is part of them.)
    let decoded_whole = matches!(
        message,
        Message::Sign(_) | Message::SessionBind(_) | Message::ForgedSessionBind(_)
    );
    if decoded_whole {
        let longer = [data, &[0]].concat();
        assert!(
            parse(&longer).is_err(),
            "a byte after a whole request was taken: {message:?}"
        );
    }
    let again = match &message {
        Message::Sign(request) => Request::SignRequest(request.clone()),
        Message::SessionBind(bind) => {
            Request::Extension(Extension::new_message(bind.clone()).expect("a session-bind read encodes"))
        }
        _ => return,
    };
    let mut bytes = Vec::new();
    again.encode(&mut bytes).expect("a request read encodes");
    assert_eq!(
        parse(&bytes),
        Ok(message),
        "a request read and encoded again reads differently"
    );
}
