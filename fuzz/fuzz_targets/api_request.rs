//! The API server's request path without the socket: bytes as a client might send them on
//! one connection -> `http::parse` (pipelined, request after request) -> `router::route` ->
//! the response bytes. Any panic is a bug: the API thread must survive every input.
//!
//! Checked beyond "no panic":
//! - a complete request used at least one byte and no more than the buffer held, and its
//!   body respects the body limit;
//! - every response encodes to a well-formed head whose Content-Length is the body's length.

#![no_main]

use ember::api::http::{self, Parsed, Response};
use ember::api::router;
use ember::vmm::action::VmmAction;
use libfuzzer_sys::fuzz_target;

/// ember's default `--api-max-payload` (Firecracker's `http_api_max_payload_size`).
const DEFAULT_MAX_BODY: usize = 51200;
/// A small limit, so the "body too large" path is reachable from short inputs.
const SMALL_MAX_BODY: usize = 16;

fuzz_target!(|data: &[u8]| {
    for max_body in [SMALL_MAX_BODY, DEFAULT_MAX_BODY] {
        serve(data, max_body);
    }
});

/// What `ApiServer::serve` does with one connection's input, minus the VMM round trip.
fn serve(data: &[u8], max_body: usize) {
    let mut rest = data;
    while !rest.is_empty() {
        match http::parse(rest, max_body) {
            Ok(Parsed::Incomplete { .. }) => return,
            Ok(Parsed::Complete(req, used)) => {
                assert!(used > 0, "a complete request used no bytes");
                assert!(
                    used <= rest.len(),
                    "a request used {used} bytes of a {}-byte buffer",
                    rest.len()
                );
                assert!(
                    req.body.len() <= max_body,
                    "a {}-byte body passed a {max_body}-byte limit",
                    req.body.len()
                );
                let response = match router::route(&req.method, &req.path, &req.body) {
                    Ok(action) => answer(&action),
                    Err(e) => Response::fault(400, &e.to_string()),
                };
                check_encoding(&response, req.close);
                if req.close {
                    return;
                }
                rest = &rest[used..];
            }
            Err(e) => {
                // The server refuses and closes: the refusal is encoded too.
                check_encoding(&Response::fault(e.status(), &e.to_string()), true);
                return;
            }
        }
    }
}

/// A stand-in for the VMM's answer: echoes what the request carried back as JSON (so the
/// typed bodies' serialisation is covered too), or no content, as the real answers are.
fn answer(action: &VmmAction) -> Response {
    use VmmAction::*;
    let value = match action {
        PutBootSource(c) => serde_json::to_value(c),
        PutMachineConfig(c) => serde_json::to_value(c),
        PutDrive(c) => serde_json::to_value(c),
        PutNetworkInterface(c) => serde_json::to_value(c),
        PutLogger(c) => serde_json::to_value(c),
        PutMetrics(c) => serde_json::to_value(c),
        GetPrometheusMetrics => {
            return Response::text(200, "text/plain; version=0.0.4", format!("{action:?}\n"));
        }
        GetInstanceInfo | GetVersion | GetMachineConfig | GetVmConfig => {
            Ok(serde_json::json!({ "action": format!("{action:?}") }))
        }
        _ => return Response::no_content(),
    };
    match value {
        Ok(v) => Response::json(200, &v),
        Err(e) => Response::fault(500, &format!("cannot encode the answer: {e}")),
    }
}

fn check_encoding(response: &Response, close: bool) {
    let wire = response.encode(close);
    let head_end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an encoded response has an end of head")
        + 4;
    let head = std::str::from_utf8(&wire[..head_end]).expect("the response head is UTF-8");
    let status = format!("HTTP/1.1 {} ", response.status);
    assert!(head.starts_with(&status), "bad status line: {head:?}");
    assert_eq!(
        head.contains("\r\nConnection: close\r\n"),
        close,
        "Connection header disagrees with close={close}: {head:?}"
    );
    let body = &wire[head_end..];
    assert_eq!(body, response.body.as_slice());
    if response.status == 204 {
        assert!(body.is_empty(), "a 204 response carries a body");
    } else {
        let length = format!("\r\nContent-Length: {}\r\n", body.len());
        assert!(head.contains(&length), "wrong Content-Length: {head:?}");
    }
}
