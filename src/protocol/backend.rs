//! Server messages the proxy acts on outside the hot path (server login, the proxy's own statements, resets),
//! decoded with the `pgwire` crate's message types: ErrorResponse/NoticeResponse fields, ParameterStatus and
//! BackendKeyData.
//!
//! Where pgwire does not fit, this module guards it or does without it, and the tests keep the reasons:
//! - pgwire's decoders are lenient and some panic on short input (`ErrorResponse` reads past a body without
//!   its final NUL through `Buf::get_u8`, `ParameterStatus` turns a missing string into ""), so every body is
//!   checked for the layout Postgres sends before pgwire sees it, and a malformed one is a protocol error here;
//! - they allocate a `Vec` of owned strings per message, so the relay's per-message scan of server bytes
//!   (`relay::frame`) reads the few fields it needs from a bounded prefix of the body instead;
//! - client input is never decoded with pgwire (see `startup`): its `Startup` decoder accepts what Postgres
//!   refuses.

use super::ProtocolError;
use bytes::BytesMut;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};

/// The fields of an ErrorResponse or NoticeResponse the proxy reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// `V` (non-localized) when present, else `S`.
    pub severity: String,
    pub code: String,
    pub message: String,
}

fn context() -> DecodeContext {
    DecodeContext::new(ProtocolVersion::PROTOCOL3_0)
}

/// Number of NUL-terminated strings `body` is made of, or `None` if it does not end with a NUL.
fn cstrings(body: &[u8]) -> Option<usize> {
    (body.last() == Some(&0)).then(|| body.iter().filter(|b| **b == 0).count())
}

/// Decode an ErrorResponse/NoticeResponse body (after the 5-byte header).
pub fn error_fields(body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let bad = || ProtocolError::Malformed("ErrorResponse");
    // Fields are (tag byte, string) pairs and the list ends with a zero tag: the body ends with two NULs
    // (the last field's terminator and the zero tag), or is the single zero tag.
    let ok = body == [0] || (body.len() >= 3 && body.ends_with(&[0, 0]) && cstrings(body).is_some());
    if !ok {
        return Err(bad());
    }
    let e = ErrorResponse::decode_body(&mut BytesMut::from(body), body.len() + 4, &context()).map_err(|_| bad())?;
    let mut f = ErrorFields::default();
    for (tag, value) in e.fields {
        match tag {
            b'V' => f.severity = value,
            b'S' if f.severity.is_empty() => f.severity = value,
            b'C' => f.code = value,
            b'M' => f.message = value,
            _ => {}
        }
    }
    Ok(f)
}

/// Decode a ParameterStatus body into (name, value).
pub fn parameter_status(body: &[u8]) -> Result<(String, String), ProtocolError> {
    if cstrings(body) != Some(2) || body[0] == 0 {
        return Err(ProtocolError::Malformed("ParameterStatus"));
    }
    let p = ParameterStatus::decode_body(&mut BytesMut::from(body), body.len() + 4, &context())
        .map_err(|_| ProtocolError::Malformed("ParameterStatus"))?;
    Ok((p.name, p.value))
}

/// Decode a protocol 3.0 BackendKeyData body into (pid, secret).
pub fn backend_key_data(body: &[u8]) -> Result<(i32, i32), ProtocolError> {
    if body.len() != 8 {
        return Err(ProtocolError::Malformed("BackendKeyData"));
    }
    let k = BackendKeyData::decode_body(&mut BytesMut::from(body), body.len() + 4, &context())
        .map_err(|_| ProtocolError::Malformed("BackendKeyData"))?;
    match k.secret_key {
        SecretKey::I32(secret) => Ok((k.pid, secret)),
        SecretKey::Bytes(_) => Err(ProtocolError::Malformed("BackendKeyData")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self, Severity};

    #[test]
    fn error_fields_round_trip() {
        let mut b = BytesMut::new();
        protocol::error_response(&mut b, Severity::Fatal, "53300", "too many", Some("d"));
        let f = error_fields(&b[5..]).unwrap();
        assert_eq!((f.severity.as_str(), f.code.as_str(), f.message.as_str()), ("FATAL", "53300", "too many"));
        assert_eq!(error_fields(&[0]).unwrap(), ErrorFields::default());
    }

    #[test]
    fn truncated_bodies_are_errors_not_panics() {
        // pgwire's ErrorResponse decoder alone would panic on these (it reads a tag byte past the end).
        for body in [&b""[..], b"SERROR", b"SERROR\0", b"SERROR\0C", b"\x01"] {
            assert!(error_fields(body).is_err(), "{body:?}");
        }
        let r = std::panic::catch_unwind(|| {
            ErrorResponse::decode_body(&mut BytesMut::from(&b"SERROR\0"[..]), 11, &context())
        });
        assert!(r.is_err(), "pgwire's decoder needs the guard");
    }

    #[test]
    fn parameter_status_needs_both_strings() {
        let mut b = BytesMut::new();
        protocol::parameter_status(&mut b, "TimeZone", "UTC");
        assert_eq!(parameter_status(&b[5..]).unwrap(), ("TimeZone".to_owned(), "UTC".to_owned()));
        assert!(parameter_status(b"TimeZone\0").is_err());
        assert!(parameter_status(b"\0UTC\0").is_err());
        // What pgwire makes of a missing value on its own: an empty string, silently.
        let p = ParameterStatus::decode_body(&mut BytesMut::from(&b"TimeZone\0"[..]), 13, &context()).unwrap();
        assert_eq!(p.value, "");
    }

    #[test]
    fn backend_key_data_is_pid_and_secret() {
        let mut b = BytesMut::new();
        protocol::backend_key_data(&mut b, 42, -7);
        assert_eq!(backend_key_data(&b[5..]).unwrap(), (42, -7));
        assert!(backend_key_data(&[0, 0, 0, 1]).is_err());
    }
}
