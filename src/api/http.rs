//! The HTTP/1.1 wire format, as much of it as the API needs: a request head parsed by
//! `httparse`, a `Content-Length` body, keep-alive and pipelining; and responses.

/// The largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Headers beyond this count make the request malformed.
const MAX_HEADERS: usize = 32;

/// One complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// A request the server refuses before routing; the connection closes after the answer,
/// because where the next request starts can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("request head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("request body of {len} bytes is larger than the limit of {limit} bytes")]
    BodyTooLarge { len: usize, limit: usize },
    #[error("chunked transfer encoding is not supported; send a Content-Length")]
    Chunked,
    #[error("HTTP version {0} is not supported")]
    Version(u8),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BodyTooLarge { .. } => 413,
            _ => 400,
        }
    }
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `expects_continue` is set when the head is complete and the
    /// client waits for `100 Continue` before sending the body (curl does for larger bodies).
    Incomplete { expects_continue: bool },
    /// A request, and how many bytes of the buffer it used.
    Complete(Request, usize),
}

fn header_value<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn contains_token(value: &[u8], token: &str) -> bool {
    String::from_utf8_lossy(value)
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The longest `fault_message`, in characters.
pub const MAX_FAULT_CHARS: usize = 1024;

/// Parses the first request in `buf`.
pub fn parse(buf: &[u8], max_body: usize) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD_BYTES {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(Parsed::Incomplete {
                expects_continue: false,
            });
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let version = req.version.unwrap_or(1);
    if version > 1 {
        return Err(HttpError::Version(version));
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Err(HttpError::Malformed("no request line".into()));
    };
    let headers = req.headers;
    if header_value(headers, "transfer-encoding").is_some() {
        return Err(HttpError::Chunked);
    }
    // RFC 9112, 6.3: one Content-Length of decimal digits; anything else (a sign, a list,
    // a second header) leaves the message length unknown and the request is refused.
    let mut lengths = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    let body_len = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(_), Some(_)) => {
            return Err(HttpError::Malformed(
                "more than one Content-Length header".into(),
            ));
        }
        (Some(h), None) => {
            let digits = h.value.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(HttpError::Malformed("invalid Content-Length".into()));
            }
            std::str::from_utf8(digits)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| HttpError::Malformed("invalid Content-Length".into()))?
        }
    };
    if body_len > max_body {
        return Err(HttpError::BodyTooLarge {
            len: body_len,
            limit: max_body,
        });
    }
    let connection = header_value(headers, "connection");
    // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes unless told.
    let close = match version {
        0 => !connection.is_some_and(|v| contains_token(v, "keep-alive")),
        _ => connection.is_some_and(|v| contains_token(v, "close")),
    };
    let total = head_len + body_len;
    if buf.len() < total {
        let expects_continue =
            header_value(headers, "expect").is_some_and(|v| contains_token(v, "100-continue"));
        return Ok(Parsed::Incomplete { expects_continue });
    }
    Ok(Parsed::Complete(
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            body: buf[head_len..total].to_vec(),
            close,
        },
        total,
    ))
}

/// A response ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn no_content() -> Self {
        Response {
            status: 204,
            content_type: "",
            body: Vec::new(),
        }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Response {
            status,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
        }
    }

    /// An error in Firecracker's shape: `{"fault_message": "..."}`.
    /// An error answer. Messages can quote what the client sent (a path, a value); a long
    /// one is cut, so a megabyte request is not echoed back.
    pub fn fault(status: u16, message: &str) -> Self {
        let message = match message.char_indices().nth(MAX_FAULT_CHARS) {
            Some((cut, _)) => format!("{}... (cut)", &message[..cut]),
            None => message.to_owned(),
        };
        Self::json(status, &serde_json::json!({ "fault_message": message }))
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            408 => "Request Timeout",
            413 => "Payload Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self, close: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: ember\r\n",
            self.status,
            self.reason()
        );
        if close {
            head.push_str("Connection: close\r\n");
        }
        if self.status != 204 {
            if !self.content_type.is_empty() {
                head.push_str(&format!("Content-Type: {}\r\n", self.content_type));
            }
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf, 1024).unwrap() {
            Parsed::Complete(r, n) => (r, n),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn request_with_body_and_pipelining() {
        let two = b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n";
        let (r, n) = complete(two);
        assert_eq!(
            (
                r.method.as_str(),
                r.path.as_str(),
                r.body.as_slice(),
                r.close
            ),
            ("PUT", "/machine-config", &b"{}"[..], false)
        );
        let (r2, m) = complete(&two[n..]);
        assert_eq!((r2.method.as_str(), r2.path.as_str()), ("GET", "/"));
        assert_eq!(n + m, two.len());
    }

    #[test]
    fn incomplete_head_and_body() {
        assert_eq!(
            parse(b"GET / HTT", 10).unwrap(),
            Parsed::Incomplete {
                expects_continue: false
            }
        );
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", 10).unwrap(),
            Parsed::Incomplete {
                expects_continue: false
            }
        );
        assert_eq!(
            parse(
                b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
                10
            )
            .unwrap(),
            Parsed::Incomplete {
                expects_continue: true
            }
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 10),
            Err(HttpError::BodyTooLarge { len: 11, limit: 10 })
        );
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 10),
            Err(HttpError::Chunked)
        );
        assert!(matches!(
            parse(b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n", 10),
            Err(HttpError::Malformed(_))
        ));
        for bad in [
            &b"PUT /x HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}"[..],
            b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n{}",
            b"PUT /x HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}",
            b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 0\r\n\r\n{}",
            b"PUT /x HTTP/1.1\r\nContent-Length: \r\n\r\n{}",
        ] {
            assert!(
                matches!(parse(bad, 10), Err(HttpError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parse(b"PUT /x HTTP/1.1\r\nContent-Length:  2 \r\n\r\n{}", 10),
            Ok(Parsed::Complete(_, _))
        ));
        assert!(matches!(
            parse(b"\x01\x02 / HTTP/1.1\r\n\r\n", 10),
            Err(HttpError::Malformed(_))
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(big.as_bytes(), 10), Err(HttpError::HeadTooLarge));
        assert_eq!(HttpError::BodyTooLarge { len: 1, limit: 0 }.status(), 413);
    }

    #[test]
    fn connection_semantics() {
        assert!(
            complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .close
        );
        assert!(complete(b"GET / HTTP/1.0\r\n\r\n").0.close);
        assert!(
            !complete(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .close
        );
    }

    #[test]
    fn response_encoding() {
        let r = Response::fault(400, "bad").encode(false);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.contains("Content-Type: application/json\r\nContent-Length: 23\r\n\r\n{\"fault_message\":\"bad\"}"), "{text}");
        let nc = String::from_utf8(Response::no_content().encode(true)).unwrap();
        assert_eq!(
            nc,
            "HTTP/1.1 204 No Content\r\nServer: ember\r\nConnection: close\r\n\r\n"
        );
    }
}
