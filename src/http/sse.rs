//! Server-sent events in a stored body: a replay that carries `Last-Event-ID` resumes after
//! the event it names instead of sending the whole stream again.
//!
//! The stored body is read as the WHATWG HTML standard's event stream parser reads it (§ 9.2.6,
//! "Interpreting an event stream"): lines end with CRLF, LF or CR; a leading byte order mark is
//! skipped; a line starting with `:` is a comment; `field:value` (one space after the colon
//! dropped) or `field` alone (an empty value); an `id` whose value contains NUL is ignored; a
//! blank line dispatches an event, and a client's *last event ID* is then the value of the last
//! `id` field seen, whether or not this event had one (the buffer is never reset by a dispatch);
//! a last line or event that is not terminated is never dispatched.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, Response};

use super::response_body::ResponseBody;

/// The header an SSE client sends when it reconnects: the id of the last event it received.
pub(crate) const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// A request's `Last-Event-ID`, boxed: the replay futures hold it across their await, and a
/// box adds 8 bytes to them where the value would add 40. A request with few headers is
/// scanned, as the key is ([`key::read`](super::key)): looking up a name that is not a standard
/// one hashes it, which cost every replay about 190 instructions (`benches/instructions.sh`).
pub(crate) fn last_event_id(headers: &HeaderMap) -> Option<Box<HeaderValue>> {
    let value = if headers.len() <= super::key::SCANNED {
        headers
            .iter()
            .find_map(|(name, value)| (*name == LAST_EVENT_ID).then_some(value))
    } else {
        headers.get(LAST_EVENT_ID)
    };
    value.cloned().map(Box::new)
}

/// Whether `headers` say the body is an event stream (`text/event-stream`, any parameters).
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Where in `body` the events after the one a client knows as `last_id` begin: the byte just
/// after the first dispatch (blank line) at which the last event ID is `last_id`. `None` when
/// no dispatched event has that last event ID, or `last_id` is empty (a client with no last
/// event ID sends none).
///
/// The first such dispatch, not the last: events without an `id` that follow the one that set
/// it share its last event ID, and the client may or may not have received them; they are sent
/// again rather than lost (so are later events that repeat the id).
pub(crate) fn resume_at(body: &[u8], last_id: &[u8]) -> Option<usize> {
    if last_id.is_empty() {
        return None;
    }
    let mut at = if body.starts_with("\u{feff}".as_bytes()) {
        3
    } else {
        0
    };
    let mut id: &[u8] = b"";
    while let Some(len) = body[at..].iter().position(|&b| b == b'\n' || b == b'\r') {
        let line = &body[at..at + len];
        at += len + 1;
        if body[at - 1] == b'\r' && body.get(at) == Some(&b'\n') {
            at += 1;
        }
        if line.is_empty() {
            if id == last_id {
                return Some(at);
            }
            continue;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => continue,
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if field == b"id" && !value.contains(&0) {
            id = value;
        }
    }
    None
}

/// A replay of a stored event stream resumed after `last_id`: the same status, headers and
/// trailers, the body from [`resume_at`] on (`Content-Length`, if the stored headers have one,
/// set to its length). Any other response, or an id no event has, is returned whole: a client
/// whose position is unknown gets every event again (it can drop those it has by their ids)
/// rather than losing some.
pub(crate) fn resume<B>(
    response: Response<ResponseBody<B>>,
    last_id: &HeaderValue,
) -> Response<ResponseBody<B>> {
    if !is_event_stream(response.headers()) || !response.body().is_in_memory() {
        return response;
    }
    let (mut head, body) = response.into_parts();
    let (data, trailers) = body.into_full();
    let data = data.unwrap_or_default();
    let Some(at) = resume_at(&data, last_id.as_bytes()) else {
        tracing::debug!(
            outcome = "resume_unknown_id",
            "Last-Event-ID names no stored event; replaying the whole stream"
        );
        return Response::from_parts(head, ResponseBody::full_with_trailers(data, trailers));
    };
    let tail: Bytes = data.slice(at..);
    if head.headers.contains_key(CONTENT_LENGTH) {
        head.headers
            .insert(CONTENT_LENGTH, HeaderValue::from(tail.len()));
    }
    Response::from_parts(head, ResponseBody::full_with_trailers(tail, trailers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tail<'a>(body: &'a str, id: &str) -> Option<&'a str> {
        resume_at(body.as_bytes(), id.as_bytes()).map(|at| &body[at..])
    }

    #[test]
    fn resumes_after_the_event_with_the_id() {
        let body = "id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n";
        assert_eq!(
            tail(body, "1"),
            Some("id: 2\ndata: b\n\nid: 3\ndata: c\n\n")
        );
        assert_eq!(tail(body, "3"), Some(""));
        assert_eq!(tail(body, "4"), None, "an id no event has");
        assert_eq!(tail(body, ""), None, "an empty id");
        assert_eq!(
            tail(body, " 1"),
            None,
            "one space after the colon is dropped, not two"
        );
    }

    #[test]
    fn reads_every_line_end_and_the_optional_space() {
        let body = "id:1\r\ndata: a\r\n\r\nid: 2\rdata: b\r\rid: 3\ndata: c\n\n";
        assert_eq!(
            tail(body, "1"),
            Some("id: 2\rdata: b\r\rid: 3\ndata: c\n\n")
        );
        assert_eq!(tail(body, "2"), Some("id: 3\ndata: c\n\n"));
        // A CR at the end of a line then LF is one line end, not a line end and a blank line.
        assert_eq!(tail("id: 1\r\n\r\nx", "1"), Some("x"));
    }

    #[test]
    fn events_without_ids_share_the_last_id_and_are_sent_again() {
        let body = "id: 7\ndata: a\n\ndata: b\n\nid: 8\ndata: c\n\n";
        assert_eq!(tail(body, "7"), Some("data: b\n\nid: 8\ndata: c\n\n"));
        // Without any id, no event can be named.
        assert_eq!(tail("data: a\n\ndata: b\n\n", "1"), None);
    }

    #[test]
    fn comments_bom_nul_and_field_forms() {
        let body = "\u{feff}: a comment id: 1\nid: 1\n: another\ndata: a\n\nid: 2\n\n";
        assert_eq!(tail(body, "1"), Some("id: 2\n\n"));
        assert_eq!(tail(": id: 9\n\n", "9"), None, "a comment sets no id");
        // An id with NUL is ignored: the event keeps the previous one.
        assert_eq!(tail("id: 1\n\nid: 2\0\n\nx", "1"), Some("id: 2\0\n\nx"));
        // `id` alone sets the id to empty, which no Last-Event-ID names.
        assert_eq!(tail("id: 1\nid\n\nx", "1"), None);
        // `ids: 1` is another field.
        assert_eq!(tail("ids: 1\n\n", "1"), None);
    }

    #[test]
    fn an_event_not_terminated_is_never_dispatched() {
        assert_eq!(tail("id: 1\ndata: a\n", "1"), None);
        assert_eq!(tail("id: 1\ndata: a\n\nid: 2", "2"), None);
        assert_eq!(tail("id: 1", "1"), None);
    }

    #[test]
    fn a_repeated_id_resumes_after_its_first_event() {
        let body = "id: 1\n\nid: 1\n\nid: 2\n\n";
        assert_eq!(tail(body, "1"), Some("id: 1\n\nid: 2\n\n"));
    }

    #[test]
    fn last_event_id_is_found_among_few_headers_and_many() {
        for others in [0, 3, 20] {
            let mut headers = HeaderMap::new();
            for i in 0..others {
                let name = HeaderName::try_from(format!("x-h{i}")).unwrap();
                headers.insert(name, HeaderValue::from_static("v"));
            }
            assert!(last_event_id(&headers).is_none());
            headers.append(LAST_EVENT_ID, HeaderValue::from_static("7"));
            headers.append(LAST_EVENT_ID, HeaderValue::from_static("8"));
            assert_eq!(
                *last_event_id(&headers).unwrap(),
                "7",
                "the first, as `get`"
            );
        }
    }

    #[test]
    fn only_event_streams_are_resumed() {
        let mut headers = HeaderMap::new();
        assert!(!is_event_stream(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_event_stream(&headers));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Text/Event-Stream; charset=utf-8"),
        );
        assert!(is_event_stream(&headers));
        let body = Bytes::from_static(b"id: 1\n\nid: 2\n\n");
        let response = |content_type: &'static str| {
            let mut response = Response::new(ResponseBody::<()>::full(body.clone()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            response
        };
        let id = HeaderValue::from_static("1");
        let resumed = resume(response("text/event-stream"), &id);
        assert_eq!(resumed.headers()[CONTENT_LENGTH], "7");
        assert_eq!(resumed.into_body().into_full().0.unwrap(), "id: 2\n\n");
        let json = resume(response("application/json"), &id);
        assert_eq!(json.headers()[CONTENT_LENGTH], "14");
        assert_eq!(json.into_body().into_full().0.unwrap(), body);
    }

    /// A replay whose body is the chunks the handler produced (one event each, or an event cut
    /// across two) resumes as a whole body does; a body that is not in memory is left as it is.
    #[test]
    fn a_replay_of_chunks_resumes_across_them() {
        let chunks: Vec<Bytes> = ["id: 1\ndata: a\n\n", "id: 2\nda", "ta: b\n\n", "id: 3\n\n"]
            .into_iter()
            .map(|chunk| Bytes::from_static(chunk.as_bytes()))
            .collect();
        let mut response = Response::new(ResponseBody::<http_body_util::Empty<Bytes>>::chunks(
            chunks.into(),
            None,
        ));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        let resumed = resume(response, &HeaderValue::from_static("1"));
        assert_eq!(
            resumed.into_body().into_full().0.unwrap(),
            "id: 2\ndata: b\n\nid: 3\n\n"
        );
        let mut streamed = Response::new(ResponseBody::inner(http_body_util::Full::new(
            Bytes::from_static(b"id: 1\n\nid: 2\n\n"),
        )));
        streamed
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        let untouched = resume(streamed, &HeaderValue::from_static("1"));
        assert!(
            !untouched.body().is_in_memory(),
            "a body not in memory is not read"
        );
    }

    /// An event: an id, data lines, perhaps a comment, with one of the three line ends.
    fn event() -> impl Strategy<Value = (Vec<String>, &'static str, bool)> {
        (
            proptest::collection::vec("[a-z0-9 :]{0,8}", 0..3),
            prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
            any::<bool>(),
        )
    }

    proptest! {
        /// A stream split at any event boundary: the events after the split are its tail.
        #[test]
        fn resuming_after_any_event_is_the_rest(
            events in proptest::collection::vec(event(), 1..20),
            split in any::<prop::sample::Index>(),
        ) {
            let mut body = String::new();
            let mut ends = Vec::new();
            for (n, (data, eol, comment)) in events.iter().enumerate() {
                if *comment {
                    body.push_str(&format!(":c{eol}"));
                }
                body.push_str(&format!("id: {n}{eol}"));
                for line in data {
                    body.push_str(&format!("data: {line}{eol}"));
                }
                body.push_str(eol);
                ends.push(body.len());
            }
            let k = split.index(events.len());
            let at = resume_at(body.as_bytes(), k.to_string().as_bytes());
            prop_assert_eq!(at, Some(ends[k]));
            prop_assert_eq!(resume_at(body.as_bytes(), events.len().to_string().as_bytes()), None);
        }
    }
}
