//! A tiny HTTP/1.1 GET over a std `TcpStream` with timeouts, enough to read what an app instance
//! serves (`/`, `/healthz`, `/origin`, `/pid`), the controller's HTTP listener and Prometheus'
//! API (chunked answers included).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// `GET path` from `host:port`; returns the status and the body, or why it failed.
pub fn get(host: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("bad address {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("no address for {host}:{port}"))?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("set timeouts: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    parse_response(&raw)
}

/// `GET path` on the example app of a host; the body when the status is 200, else `None`.
pub fn get_ok(host: &str, path: &str) -> Option<String> {
    match get(host, crate::WEB_PORT, path) {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("incomplete HTTP response: {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if chunked {
        return Ok((status, dechunk(body)));
    }
    Ok((status, body.to_string()))
}

/// The body of a `Transfer-Encoding: chunked` answer (Prometheus' API sends larger ones so).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            out.push_str(&rest[..size.min(rest.len())]);
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let raw = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\nno\n";
        assert_eq!(parse_response(raw), Ok((500, "no\n".to_string())));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nFlee\r\n9\r\ntHostLost\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw), Ok((200, "FleetHostLost".to_string())));
    }
}
