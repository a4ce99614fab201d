//! HTTP/1.x handling of guest metadata requests (hostile input).

use std::fmt::Write as _;
use std::time::Instant;

use super::data_store::{DataStoreError, OutputFormat};
use super::token::TokenError;
use super::{Mmds, MmdsVersion};

/// Largest request (head and body) accepted; bigger ones get 413 and the connection closes.
pub const MAX_REQUEST_SIZE: usize = 4096;
/// Path of the V2 session token resource.
pub const TOKEN_PATH: &str = "/latest/api/token";

const MAX_HEADERS: usize = 32;
const TOKEN_HEADERS: [&str; 2] = ["X-metadata-token", "X-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "X-metadata-token-ttl-seconds",
    "X-aws-ec2-metadata-token-ttl-seconds",
];
/// Tokens must not be obtainable through a proxy running in the guest, as EC2 IMDS
/// clients expect.
const FORWARDED_FOR: &str = "X-Forwarded-For";
const TEXT_PLAIN: &str = "text/plain";
const APPLICATION_JSON: &str = "application/json";
/// Keeps error bodies that echo guest input short.
const MAX_ECHO: usize = 64;

/// Outcome of looking at the bytes received so far on a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// No complete request yet; call again when more bytes arrived.
    Incomplete,
    /// A request (or an unrecoverable framing error) was answered.
    Complete(Reply),
}

/// An answered request.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// The full HTTP response.
    pub response: Vec<u8>,
    /// How many request bytes this answer used up.
    pub consumed: usize,
    /// Whether the connection must close once the response is delivered.
    pub close: bool,
}

/// Status codes MMDS answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusCode {
    /// 200
    Ok,
    /// 400
    BadRequest,
    /// 401
    Unauthorized,
    /// 404
    NotFound,
    /// 405
    MethodNotAllowed,
    /// 413
    PayloadTooLarge,
    /// 500
    InternalServerError,
    /// 501
    NotImplemented,
}

impl StatusCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Self::Ok => 200,
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::PayloadTooLarge => 413,
            Self::InternalServerError => 500,
            Self::NotImplemented => 501,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::BadRequest => "Bad Request",
            Self::Unauthorized => "Unauthorized",
            Self::NotFound => "Not Found",
            Self::MethodNotAllowed => "Method Not Allowed",
            Self::PayloadTooLarge => "Payload Too Large",
            Self::InternalServerError => "Internal Server Error",
            Self::NotImplemented => "Not Implemented",
        }
    }
}

/// Why a guest request was refused; the text is the response body.
#[derive(Debug, thiserror::Error)]
pub enum GuestHttpError {
    /// Not parseable as HTTP/1.x.
    #[error("Malformed HTTP request: {0}.")]
    Malformed(httparse::Error),
    /// Over [`MAX_REQUEST_SIZE`].
    #[error("The request is larger than {MAX_REQUEST_SIZE} bytes.")]
    TooLarge,
    /// Unparseable or conflicting `Content-Length`.
    #[error("Invalid Content-Length header.")]
    BadContentLength,
    /// Bodies must be sized by `Content-Length`.
    #[error("Transfer-Encoding is not supported.")]
    TransferEncoding,
    /// The request target has no path.
    #[error("Invalid URI.")]
    InvalidUri,
    /// Neither GET nor PUT.
    #[error("Not allowed HTTP method.")]
    MethodNotAllowed,
    /// Nothing at this path.
    #[error("Resource not found: {0}.")]
    NotFound(String),
    /// V2 GET without a token header.
    #[error(
        "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header \
         to specify the session token."
    )]
    NoToken,
    /// V2 GET with an unknown or expired token.
    #[error("MMDS token not valid.")]
    InvalidToken,
    /// Token request without a lifetime header.
    #[error(
        "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
         `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime."
    )]
    NoTtl,
    /// The lifetime header is not a number.
    #[error("Invalid value for the token time to live header: {0:?}.")]
    BadTtl(String),
    /// Token request relayed by a proxy.
    #[error("The X-Forwarded-For header is not allowed when requesting an MMDS token.")]
    ForwardedFor,
    /// Issuing the token failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The data store could not render the value.
    #[error(transparent)]
    Store(DataStoreError),
}

impl GuestHttpError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_)
            | Self::BadContentLength
            | Self::InvalidUri
            | Self::NoTtl
            | Self::BadTtl(_)
            | Self::ForwardedFor
            | Self::Token(TokenError::InvalidTtl(_)) => StatusCode::BadRequest,
            Self::TooLarge => StatusCode::PayloadTooLarge,
            Self::TransferEncoding | Self::Store(DataStoreError::UnsupportedValueType) => {
                StatusCode::NotImplemented
            }
            Self::MethodNotAllowed => StatusCode::MethodNotAllowed,
            Self::NotFound(_) => StatusCode::NotFound,
            Self::NoToken | Self::InvalidToken => StatusCode::Unauthorized,
            Self::Token(_) | Self::Store(_) => StatusCode::InternalServerError,
        }
    }
}

struct Body {
    content_type: &'static str,
    text: String,
}

/// Answers the first request in `buf` (the bytes received on one connection and not yet
/// consumed).
pub fn handle(buf: &[u8], mmds: &mut Mmds, now: Instant) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_SIZE => {
            return Parsed::Incomplete;
        }
        Ok(httparse::Status::Partial) => return fatal(GuestHttpError::TooLarge, 1, buf.len()),
        Err(err) => return fatal(GuestHttpError::Malformed(err), 1, buf.len()),
    };
    let minor = request.version.unwrap_or(1);
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return fatal(
            GuestHttpError::Malformed(httparse::Error::Token),
            minor,
            buf.len(),
        );
    };
    let headers: &[httparse::Header] = request.headers;
    let body_len = match body_length(headers) {
        Ok(len) => len,
        Err(err) => return fatal(err, minor, buf.len()),
    };
    let total = match head_len.checked_add(body_len) {
        Some(total) if total <= MAX_REQUEST_SIZE => total,
        _ => return fatal(GuestHttpError::TooLarge, minor, buf.len()),
    };
    if buf.len() < total {
        return Parsed::Incomplete;
    }

    let close = wants_close(minor, headers);
    let response = match respond(method, target, headers, mmds, now) {
        Ok(body) => build_response(minor, StatusCode::Ok, body.content_type, &body.text, close),
        Err(err) => build_response(minor, err.status(), TEXT_PLAIN, &err.to_string(), close),
    };
    Parsed::Complete(Reply {
        response,
        consumed: total,
        close,
    })
}

/// Framing is lost: answer, drop everything received and close.
fn fatal(err: GuestHttpError, minor: u8, consumed: usize) -> Parsed {
    Parsed::Complete(Reply {
        response: build_response(minor, err.status(), TEXT_PLAIN, &err.to_string(), true),
        consumed,
        close: true,
    })
}

fn respond(
    method: &str,
    target: &str,
    headers: &[httparse::Header],
    mmds: &mut Mmds,
    now: Instant,
) -> Result<Body, GuestHttpError> {
    let path = normalize_path(target)?;
    match method {
        "GET" => get(&path, headers, mmds, now),
        "PUT" => put(&path, headers, mmds, now),
        _ => Err(GuestHttpError::MethodNotAllowed),
    }
}

fn get(
    path: &str,
    headers: &[httparse::Header],
    mmds: &Mmds,
    now: Instant,
) -> Result<Body, GuestHttpError> {
    // V1 ignores tokens entirely, so V1 guests that already send one keep working.
    if mmds.version() == MmdsVersion::V2 {
        let token = header(headers, &TOKEN_HEADERS).ok_or(GuestHttpError::NoToken)?;
        let valid = std::str::from_utf8(token.trim_ascii())
            .is_ok_and(|token| mmds.tokens.is_valid(token, now));
        if !valid {
            return Err(GuestHttpError::InvalidToken);
        }
    }
    let format = if mmds.config().imds_compat {
        OutputFormat::Imds
    } else {
        accept_format(headers)
    };
    let text = mmds.store.fetch(path, format).map_err(|err| match err {
        DataStoreError::NotFound => GuestHttpError::NotFound(path.to_string()),
        other => GuestHttpError::Store(other),
    })?;
    let content_type = match format {
        OutputFormat::Json => APPLICATION_JSON,
        OutputFormat::Imds => TEXT_PLAIN,
    };
    Ok(Body { content_type, text })
}

/// PUT only creates session tokens, whatever the version, so clients written for V2 work
/// against a V1 configuration too.
fn put(
    path: &str,
    headers: &[httparse::Header],
    mmds: &mut Mmds,
    now: Instant,
) -> Result<Body, GuestHttpError> {
    if header(headers, &[FORWARDED_FOR]).is_some() {
        return Err(GuestHttpError::ForwardedFor);
    }
    if path != TOKEN_PATH {
        return Err(GuestHttpError::NotFound(path.to_string()));
    }
    let raw = header(headers, &TTL_HEADERS).ok_or(GuestHttpError::NoTtl)?;
    let ttl = parse_decimal(raw)
        .map(|ttl| u32::try_from(ttl).unwrap_or(u32::MAX))
        .ok_or_else(|| GuestHttpError::BadTtl(echo(raw)))?;
    let text = mmds.tokens.issue(ttl, now)?;
    Ok(Body {
        content_type: TEXT_PLAIN,
        text,
    })
}

/// Turns a request target into a JSON-pointer-like path: drops the scheme and authority
/// of absolute-form targets and the query, and collapses repeated slashes.
fn normalize_path(target: &str) -> Result<String, GuestHttpError> {
    let without_authority = match target.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => {
            let rest = target.get(7..).unwrap_or("");
            rest.find('/')
                .and_then(|slash| rest.get(slash..))
                .unwrap_or("")
        }
        _ => target,
    };
    let path = without_authority.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(GuestHttpError::InvalidUri);
    }
    let mut normalized = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && normalized.ends_with('/') {
            continue;
        }
        normalized.push(c);
    }
    Ok(normalized)
}

fn header<'a>(headers: &[httparse::Header<'a>], names: &[&str]) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| names.iter().any(|name| h.name.eq_ignore_ascii_case(name)))
        .map(|h| h.value)
}

/// Comma-separated tokens of every header called `name`, trimmed.
fn header_tokens<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
}

/// The first media range naming a format MMDS knows decides; IMDS text otherwise.
fn accept_format(headers: &[httparse::Header]) -> OutputFormat {
    for range in header_tokens(headers, "Accept") {
        let media = range
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if media.eq_ignore_ascii_case(APPLICATION_JSON.as_bytes()) {
            return OutputFormat::Json;
        }
        if media.eq_ignore_ascii_case(TEXT_PLAIN.as_bytes()) {
            return OutputFormat::Imds;
        }
    }
    OutputFormat::Imds
}

fn body_length(headers: &[httparse::Header]) -> Result<usize, GuestHttpError> {
    if header(headers, &["Transfer-Encoding"]).is_some() {
        return Err(GuestHttpError::TransferEncoding);
    }
    let mut length = None;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("Content-Length"))
    {
        let value = parse_decimal(h.value)
            .and_then(|value| usize::try_from(value).ok())
            .ok_or(GuestHttpError::BadContentLength)?;
        if length.is_some_and(|seen| seen != value) {
            return Err(GuestHttpError::BadContentLength);
        }
        length = Some(value);
    }
    Ok(length.unwrap_or(0))
}

/// Plain ASCII digits only (no sign), as HTTP numbers are.
fn parse_decimal(raw: &[u8]) -> Option<u64> {
    let digits = raw.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn wants_close(minor: u8, headers: &[httparse::Header]) -> bool {
    let has = |wanted: &str| {
        header_tokens(headers, "Connection")
            .any(|token| token.eq_ignore_ascii_case(wanted.as_bytes()))
    };
    if minor == 0 {
        !has("keep-alive")
    } else {
        has("close")
    }
}

fn echo(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.chars().take(MAX_ECHO).collect()
}

fn build_response(
    minor: u8,
    status: StatusCode,
    content_type: &str,
    body: &str,
    close: bool,
) -> Vec<u8> {
    let mut head = String::with_capacity(160);
    // Writing into a String cannot fail.
    let _ = write!(
        head,
        "HTTP/1.{} {} {}\r\n",
        minor.min(1),
        status.code(),
        status.reason()
    );
    if status == StatusCode::MethodNotAllowed {
        head.push_str("Allow: GET, PUT\r\n");
    }
    let _ = write!(
        head,
        "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if close {
        head.push_str("Connection: close\r\n");
    } else if minor == 0 {
        head.push_str("Connection: keep-alive\r\n");
    }
    head.push_str("\r\n");
    let mut response = head.into_bytes();
    response.extend_from_slice(body.as_bytes());
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::mmds::MmdsConfig;

    struct Answer {
        status: u16,
        minor: u8,
        headers: Vec<(String, String)>,
        body: String,
        consumed: usize,
        close: bool,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    fn mmds(version: MmdsVersion, imds_compat: bool) -> Mmds {
        let mut mmds = Mmds::new(MmdsConfig {
            version,
            imds_compat,
            ..MmdsConfig::default()
        })
        .unwrap();
        mmds.store
            .put(json!({
                "latest": {"meta-data": {"ami-id": "ami-1", "net": {"a": "b"}, "n": 5}}
            }))
            .unwrap();
        mmds
    }

    fn parse_answer(reply: Reply) -> Answer {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&reply.response).unwrap() {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => panic!("partial response"),
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        let body = String::from_utf8(reply.response[head_len..].to_vec()).unwrap();
        let answer = Answer {
            status: response.code.unwrap(),
            minor: response.version.unwrap(),
            headers,
            body,
            consumed: reply.consumed,
            close: reply.close,
        };
        assert_eq!(
            answer.header("Content-Length").unwrap(),
            answer.body.len().to_string()
        );
        answer
    }

    fn ask(mmds: &mut Mmds, request: &str, now: Instant) -> Answer {
        match handle(request.as_bytes(), mmds, now) {
            Parsed::Complete(reply) => parse_answer(reply),
            Parsed::Incomplete => panic!("incomplete: {request:?}"),
        }
    }

    fn get_token(mmds: &mut Mmds, ttl: u32, now: Instant) -> String {
        let answer = ask(
            mmds,
            &format!(
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
            ),
            now,
        );
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.header("Content-Type"), Some("text/plain"));
        answer.body
    }

    #[test]
    fn incomplete_until_whole_request() {
        let mut mmds = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        let request = b"GET /latest HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..request.len() {
            assert_eq!(
                handle(&request[..cut], &mut mmds, now),
                Parsed::Incomplete,
                "{cut}"
            );
        }
        let body = b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 4\r\n\
                     X-metadata-token-ttl-seconds: 5\r\n\r\nabcd";
        assert_eq!(
            handle(&body[..body.len() - 1], &mut mmds, now),
            Parsed::Incomplete
        );
        let Parsed::Complete(reply) = handle(body, &mut mmds, now) else {
            panic!("incomplete");
        };
        assert_eq!(reply.consumed, body.len());
    }

    #[test]
    fn pipelined_requests_consume_one_at_a_time() {
        let mut mmds = mmds(MmdsVersion::V1, false);
        let first = "GET /latest HTTP/1.1\r\n\r\n";
        let both = format!("{first}GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
        let answer = ask(&mut mmds, &both, Instant::now());
        assert_eq!(answer.consumed, first.len());
        assert_eq!(answer.body, "meta-data/");
        assert!(!answer.close);
    }

    #[test]
    fn v1_get_formats() {
        let mut mmds = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        let answer = ask(&mut mmds, "GET /latest/meta-data/ HTTP/1.1\r\n\r\n", now);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "ami-id\nn\nnet/");
        assert_eq!(answer.header("Content-Type"), Some("text/plain"));

        let answer = ask(
            &mut mmds,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
            now,
        );
        assert_eq!(answer.body, "\"ami-1\"");
        assert_eq!(answer.header("Content-Type"), Some("application/json"));

        let answer = ask(
            &mut mmds,
            "GET /latest/meta-data/n HTTP/1.1\r\naccept: text/html, Application/JSON;q=0.9\r\n\r\n",
            now,
        );
        assert_eq!(answer.body, "5");

        // Tokens are ignored by V1, even invalid ones.
        let answer = ask(
            &mut mmds,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: bogus\r\n\r\n",
            now,
        );
        assert_eq!((answer.status, answer.body.as_str()), (200, "ami-1"));
    }

    #[test]
    fn unsupported_and_missing() {
        let mut mmds = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        let answer = ask(&mut mmds, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n", now);
        assert_eq!(answer.status, 501);
        assert_eq!(
            answer.body,
            "Cannot retrieve value. The value has an unsupported type."
        );
        let answer = ask(&mut mmds, "GET /latest/nope HTTP/1.1\r\n\r\n", now);
        assert_eq!(answer.status, 404);
        assert_eq!(answer.body, "Resource not found: /latest/nope.");
        assert!(!answer.close);
    }

    #[test]
    fn uninitialized_store_is_not_found() {
        let mut mmds = Mmds::default();
        let answer = ask(&mut mmds, "GET / HTTP/1.1\r\n\r\n", Instant::now());
        assert_eq!(answer.status, 404);
    }

    #[test]
    fn imds_compat_forces_text() {
        let mut mmds = mmds(MmdsVersion::V1, true);
        let answer = ask(
            &mut mmds,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
            Instant::now(),
        );
        assert_eq!(answer.body, "ami-1");
        assert_eq!(answer.header("Content-Type"), Some("text/plain"));
    }

    #[test]
    fn v2_requires_valid_token() {
        let mut mmds = mmds(MmdsVersion::V2, false);
        let now = Instant::now();
        let answer = ask(&mut mmds, "GET /latest HTTP/1.1\r\n\r\n", now);
        assert_eq!(answer.status, 401);
        assert!(answer.body.starts_with("No MMDS token provided."));

        let answer = ask(
            &mut mmds,
            "GET /latest HTTP/1.1\r\nX-metadata-token: nope\r\n\r\n",
            now,
        );
        assert_eq!(answer.status, 401);
        assert_eq!(answer.body, "MMDS token not valid.");

        let token = get_token(&mut mmds, 10, now);
        for name in TOKEN_HEADERS {
            let answer = ask(
                &mut mmds,
                &format!("GET /latest HTTP/1.1\r\n{name}: {token}\r\n\r\n"),
                now,
            );
            assert_eq!((answer.status, answer.body.as_str()), (200, "meta-data/"));
        }
        let later = now + Duration::from_secs(10);
        let answer = ask(
            &mut mmds,
            &format!("GET /latest HTTP/1.1\r\nx-metadata-token: {token}\r\n\r\n"),
            later,
        );
        assert_eq!(answer.status, 401);
    }

    #[test]
    fn token_requests() {
        let mut mmds = mmds(MmdsVersion::V2, false);
        let now = Instant::now();
        let answer = ask(
            &mut mmds,
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
            now,
        );
        assert_eq!(answer.status, 200);
        assert!(mmds.tokens.is_valid(&answer.body, now));

        let answer = ask(&mut mmds, "PUT /latest/api/token HTTP/1.1\r\n\r\n", now);
        assert_eq!(answer.status, 400);
        assert!(
            answer
                .body
                .starts_with("Token time to live value not found.")
        );

        for (ttl, needle) in [
            ("0", "between 1 and 21600"),
            ("21601", "between 1 and 21600"),
            ("99999999999", "between 1 and 21600"),
            ("-1", "Invalid value"),
            ("ten", "Invalid value"),
        ] {
            let answer = ask(
                &mut mmds,
                &format!(
                    "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
                ),
                now,
            );
            assert_eq!(answer.status, 400, "{ttl}");
            assert!(answer.body.contains(needle), "{ttl}: {}", answer.body);
        }

        let answer = ask(
            &mut mmds,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\
             X-Forwarded-For: 10.0.0.1\r\n\r\n",
            now,
        );
        assert_eq!(answer.status, 400);
        assert!(answer.body.contains("X-Forwarded-For"));

        let answer = ask(
            &mut mmds,
            "PUT /latest/meta-data HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
            now,
        );
        assert_eq!(answer.status, 404);
        assert_eq!(mmds.tokens.len(), 1);
    }

    #[test]
    fn v1_also_issues_tokens() {
        let mut mmds = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        let token = get_token(&mut mmds, 60, now);
        assert!(mmds.tokens.is_valid(&token, now));
    }

    #[test]
    fn other_methods_refused() {
        let mut mmds = mmds(MmdsVersion::V2, false);
        for method in ["POST", "PATCH", "DELETE", "HEAD", "OPTIONS", "FOO"] {
            let answer = ask(
                &mut mmds,
                &format!("{method} /latest HTTP/1.1\r\n\r\n"),
                Instant::now(),
            );
            assert_eq!(answer.status, 405, "{method}");
            assert_eq!(answer.header("Allow"), Some("GET, PUT"));
            assert_eq!(answer.body, "Not allowed HTTP method.");
        }
    }

    #[test]
    fn request_targets() {
        let mut mmds = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        for target in [
            "http://169.254.169.254/latest/meta-data/ami-id",
            "HTTP://host//latest///meta-data/ami-id",
            "/latest/meta-data/ami-id?x=1",
            "/latest/meta-data/ami-id#frag",
        ] {
            let answer = ask(&mut mmds, &format!("GET {target} HTTP/1.1\r\n\r\n"), now);
            assert_eq!(answer.body, "ami-1", "{target}");
        }
        for target in ["http://", "http://host", "*", "latest"] {
            let answer = ask(&mut mmds, &format!("GET {target} HTTP/1.1\r\n\r\n"), now);
            assert_eq!(answer.status, 400, "{target}");
            assert_eq!(answer.body, "Invalid URI.");
        }
    }

    #[test]
    fn connection_semantics() {
        let mut mmds = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        let answer = ask(
            &mut mmds,
            "GET /latest HTTP/1.1\r\nConnection: Close\r\n\r\n",
            now,
        );
        assert!(answer.close);
        assert_eq!(answer.header("Connection"), Some("close"));

        let answer = ask(&mut mmds, "GET /latest HTTP/1.0\r\n\r\n", now);
        assert!(answer.close);
        assert_eq!(answer.minor, 0);

        let answer = ask(
            &mut mmds,
            "GET /latest HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            now,
        );
        assert!(!answer.close);
        assert_eq!(answer.header("Connection"), Some("keep-alive"));

        let answer = ask(&mut mmds, "GET /latest HTTP/1.1\r\n\r\n", now);
        assert!(!answer.close);
        assert_eq!(answer.header("Connection"), None);
    }

    #[test]
    fn framing_errors_close() {
        let mut mmds = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        let cases = [
            ("GARBAGE\r\n\r\n".to_string(), 400),
            ("GET / HTTP/2.0\r\n\r\n".to_string(), 400),
            (
                "PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_string(),
                400,
            ),
            (
                "PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_string(),
                400,
            ),
            (
                "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(),
                501,
            ),
            (
                "PUT / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n".to_string(),
                413,
            ),
            (
                format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_SIZE)),
                413,
            ),
            (
                format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(40)),
                400,
            ),
        ];
        for (request, status) in cases {
            let answer = ask(&mut mmds, &request, now);
            assert_eq!(answer.status, status, "{request:?}");
            assert!(answer.close, "{request:?}");
            assert_eq!(answer.consumed, request.len());
            assert_eq!(answer.header("Connection"), Some("close"));
        }
    }

    #[test]
    fn statuses_cover_errors() {
        assert_eq!(
            GuestHttpError::Token(TokenError::Entropy(5)).status(),
            StatusCode::InternalServerError
        );
        assert_eq!(StatusCode::PayloadTooLarge.code(), 413);
    }
}
