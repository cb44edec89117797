//! The fake API server's HTTP/1.1: requests in, JSON responses and chunked watch lines out,
//! over any stream (plain TCP or TLS).

use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};

pub(super) struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// The `Authorization` header's value, if any.
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

pub(super) fn read_request(r: &mut impl BufRead) -> Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0usize;
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let mut body = vec![0u8; len];
    std::io::Read::read_exact(r, &mut body)?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_string(),
        query,
        authorization,
        body,
    }))
}

/// Percent-decoding of a query component ('+' is a space).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => out.push(v),
                    Err(_) => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
                continue;
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn respond(w: &mut impl Write, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        401 => "Unauthorized",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        w,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    w.flush()
}

pub(super) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// One line of a chunked watch stream.
pub(super) fn chunk(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    write!(w, "{:x}\r\n{line}\r\n", line.len())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(decode("spec.nodeName%3Dnode-a"), "spec.nodeName=node-a");
        assert_eq!(decode("a+b%2Fc"), "a b/c");
        assert_eq!(decode("100%"), "100%");
    }

    #[test]
    fn reads_a_request_with_its_token_and_body() {
        let raw = "POST /apis/x?a=1&b=c%2Fd HTTP/1.1\r\nAuthorization: Bearer t0k\r\n\
                   Content-Length: 2\r\n\r\n{}";
        let r = read_request(&mut raw.as_bytes())
            .expect("parsed")
            .expect("a request");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/apis/x"));
        assert_eq!(r.query["b"], "c/d");
        assert_eq!(r.authorization.as_deref(), Some("Bearer t0k"));
        assert_eq!(r.body, b"{}");
    }
}
