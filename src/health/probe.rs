//! One probe: a TCP connect, or a minimal HTTP/1.1 GET written by hand (no HTTP client
//! dependency for a request line, two headers and a status line).
//!
//! The HTTP probe reads only up to the status line, then closes: the status decides, and a
//! health endpoint's body can be large or never end.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::HealthError;
use super::check::{CheckKind, DEFAULT_EXPECT_STATUS};

/// A status line longer than this is not one.
const MAX_STATUS_LINE: usize = 1024;
/// How much of a bad status line goes into the error.
const EXCERPT_CHARS: usize = 64;

/// Runs one probe without a time limit; the caller bounds it with the check's timeout.
pub async fn probe(kind: &CheckKind) -> Result<(), HealthError> {
    match kind {
        CheckKind::Tcp { host, port } => {
            TcpStream::connect(SocketAddr::new(*host, *port))
                .await
                .map_err(HealthError::Connect)?;
            Ok(())
        }
        CheckKind::Http {
            host,
            port,
            path,
            expect_status,
            host_header,
            ..
        } => {
            let expected = expect_status.clone().unwrap_or(DEFAULT_EXPECT_STATUS);
            let host_header = host_header
                .clone()
                .unwrap_or_else(|| default_host_header(*host, *port));
            http_get(*host, *port, path, &host_header, expected).await
        }
    }
}

async fn http_get(
    host: IpAddr,
    port: u16,
    path: &str,
    host_header: &str,
    expected: RangeInclusive<u16>,
) -> Result<(), HealthError> {
    let mut stream = TcpStream::connect(SocketAddr::new(host, port))
        .await
        .map_err(HealthError::Connect)?;
    stream
        .write_all(request(path, host_header).as_bytes())
        .await
        .map_err(HealthError::Send)?;
    let line = read_status_line(&mut stream).await?;
    let status = parse_status_line(&line)?;
    if expected.contains(&status) {
        Ok(())
    } else {
        Err(HealthError::UnexpectedStatus { status, expected })
    }
}

/// `GET` with `Connection: close`, so the server does not hold the connection for reuse.
pub fn request(path: &str, host_header: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: ferrovip-health\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    )
}

/// `host:port` (IPv6 in brackets), the port left out when it is HTTP's default.
pub fn default_host_header(host: IpAddr, port: u16) -> String {
    let host = match host {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    if port == 80 {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// Reads until the first line end, at most [`MAX_STATUS_LINE`] bytes.
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, HealthError> {
    let mut buf = vec![0u8; MAX_STATUS_LINE];
    let mut filled = 0;
    loop {
        if let Some(end) = buf[..filled].iter().position(|&b| b == b'\n') {
            let line = &buf[..end];
            return Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
        }
        if filled == buf.len() {
            return Err(malformed(&buf[..filled]));
        }
        let n = stream
            .read(&mut buf[filled..])
            .await
            .map_err(HealthError::Receive)?;
        if n == 0 {
            return Err(if filled == 0 {
                HealthError::NoStatusLine
            } else {
                malformed(&buf[..filled])
            });
        }
        filled += n;
    }
}

/// `HTTP/1.x SP 3DIGIT [SP reason]` → the status code.
pub fn parse_status_line(line: &[u8]) -> Result<u16, HealthError> {
    let text = std::str::from_utf8(line).map_err(|_| malformed(line))?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let version_ok = version
        .strip_prefix("HTTP/")
        .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()));
    if !version_ok || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(line));
    }
    let status: u16 = code.parse().map_err(|_| malformed(line))?;
    if !(100..=599).contains(&status) {
        return Err(malformed(line));
    }
    Ok(status)
}

fn malformed(bytes: &[u8]) -> HealthError {
    HealthError::MalformedStatusLine {
        excerpt: String::from_utf8_lossy(bytes)
            .chars()
            .take(EXCERPT_CHARS)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn status_lines() {
        let cases: [(&[u8], Option<u16>); 10] = [
            (b"HTTP/1.1 200 OK", Some(200)),
            (b"HTTP/1.0 503 Service Unavailable", Some(503)),
            (b"HTTP/1.1 204", Some(204)),
            (b"HTTP/2 301 Moved", Some(301)),
            (b"HTTP/1.1 2000 OK", None),
            (b"HTTP/1.1 abc OK", None),
            (b"HTTP/1.1 099 Low", None),
            (b"SSH-2.0-OpenSSH_9.6", None),
            (b"", None),
            (b"HTTP/1.1 200\xff", None),
        ];
        for (line, want) in cases {
            let got = parse_status_line(line);
            match want {
                Some(code) => assert_eq!(got.unwrap(), code),
                None => assert_eq!(
                    got.unwrap_err().metric_label(),
                    "malformed_status_line",
                    "{:?}",
                    String::from_utf8_lossy(line)
                ),
            }
        }
    }

    #[test]
    fn malformed_excerpt_is_bounded() {
        let err = parse_status_line(&[b'x'; 500]).unwrap_err();
        let HealthError::MalformedStatusLine { excerpt } = err else {
            panic!("{err:?}")
        };
        assert_eq!(excerpt.len(), EXCERPT_CHARS);
    }

    #[test]
    fn request_has_the_request_line_host_and_close() {
        assert_eq!(
            request("/healthz", "10.0.0.1:8080"),
            "GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: ferrovip-health\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn host_header_brackets_ipv6_and_drops_port_80() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(default_host_header(v4, 80), "10.0.0.1");
        assert_eq!(default_host_header(v4, 8080), "10.0.0.1:8080");
        assert_eq!(default_host_header(v6, 80), "[::1]");
        assert_eq!(default_host_header(v6, 8443), "[::1]:8443");
    }
}
