//! One probe: a TCP connect, or a minimal HTTP/1.1 GET written by hand (no HTTP client
//! dependency for a request line, two headers and a status line), over TLS for `https`.
//!
//! The HTTP probe reads only up to the status line, then closes: the status decides, and a
//! health endpoint's body can be large or never end.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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
            https,
            expect_status,
            host_header,
        } => {
            let expected = expect_status.clone().unwrap_or(DEFAULT_EXPECT_STATUS);
            let host_header = host_header
                .clone()
                .unwrap_or_else(|| default_host_header(*host, *port, *https));
            let stream = TcpStream::connect(SocketAddr::new(*host, *port))
                .await
                .map_err(HealthError::Connect)?;
            if *https {
                let name = server_name(*host, &host_header);
                let mut tls = TlsConnector::from(tls_config())
                    .connect(name, stream)
                    .await
                    .map_err(HealthError::Tls)?;
                http_get(&mut tls, path, &host_header, expected).await
            } else {
                let mut stream = stream;
                http_get(&mut stream, path, &host_header, expected).await
            }
        }
    }
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
    host_header: &str,
    expected: RangeInclusive<u16>,
) -> Result<(), HealthError> {
    stream
        .write_all(request(path, host_header).as_bytes())
        .await
        .map_err(HealthError::Send)?;
    let line = read_status_line(stream).await?;
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

/// `host:port` (IPv6 in brackets), the port left out when it is the scheme's default.
pub fn default_host_header(host: IpAddr, port: u16, https: bool) -> String {
    let host = match host {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    if port == if https { 443 } else { 80 } {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// The TLS server name: the Host header's host when it is a DNS name, else the address.
fn server_name(host: IpAddr, host_header: &str) -> ServerName<'static> {
    let name = match host_header.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host_header,
    };
    match ServerName::try_from(name.to_owned()) {
        Ok(dns @ ServerName::DnsName(_)) => dns,
        _ => ServerName::IpAddress(host.into()),
    }
}

/// One client configuration for every HTTPS check: any certificate is accepted, as the
/// kubelet's probes do, but the handshake's signatures are still checked.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Accepts the server's certificate whatever it is (a health check asks whether the service
/// answers, not who it is), and verifies the handshake signatures with the provider.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Reads until the first line end, at most [`MAX_STATUS_LINE`] bytes.
async fn read_status_line<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, HealthError> {
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
        assert_eq!(default_host_header(v4, 80, false), "10.0.0.1");
        assert_eq!(default_host_header(v4, 8080, false), "10.0.0.1:8080");
        assert_eq!(default_host_header(v6, 80, false), "[::1]");
        assert_eq!(default_host_header(v6, 8443, false), "[::1]:8443");
        assert_eq!(default_host_header(v4, 443, true), "10.0.0.1");
        assert_eq!(default_host_header(v4, 80, true), "10.0.0.1:80");
    }

    #[test]
    fn tls_server_name_is_the_host_headers_dns_name_or_the_address() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let dns = |s: &str| ServerName::try_from(s.to_owned()).unwrap();
        assert_eq!(server_name(v4, "app.example:8443"), dns("app.example"));
        assert_eq!(server_name(v4, "app.example"), dns("app.example"));
        assert_eq!(
            server_name(v4, "10.0.0.1:8443"),
            ServerName::IpAddress(v4.into())
        );
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            server_name(v6, "[::1]:8443"),
            ServerName::IpAddress(v6.into())
        );
    }

    /// `openssl s_server -www` with a fresh self-signed certificate: a real TLS server that
    /// answers any GET with `HTTP/1.0 200 ok`. Killed and its files removed when dropped.
    struct TlsServer {
        child: std::process::Child,
        dir: std::path::PathBuf,
        port: u16,
    }

    impl TlsServer {
        fn start() -> TlsServer {
            let dir = std::env::temp_dir().join(format!(
                "ferrovip-https-probe-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            let made = std::process::Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(["-subj", "/CN=probe.test", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .expect("openssl (Debian package openssl) is needed for this test");
            assert!(made.status.success(), "{made:?}");
            // A port nobody listens on: bind, read it, release it for s_server.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("openssl")
                .args(["s_server", "-www", "-quiet", "-accept"])
                .arg(port.to_string())
                .arg("-cert")
                .arg(&cert)
                .arg("-key")
                .arg(&key)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let server = TlsServer { child, dir, port };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "s_server did not start"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            server
        }
    }

    impl Drop for TlsServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn https_check(port: u16, https: bool, expect: Option<RangeInclusive<u16>>) -> CheckKind {
        CheckKind::Http {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            path: "/".into(),
            https,
            expect_status: expect,
            host_header: Some("probe.test".into()),
        }
    }

    #[tokio::test]
    async fn an_https_check_speaks_tls_to_a_real_server_with_any_certificate() {
        let server = TlsServer::start();
        // Self-signed for another name: still passes, as the kubelet's probes do.
        probe(&https_check(server.port, true, None)).await.unwrap();
        let err = probe(&https_check(server.port, true, Some(500..=599)))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "HTTP status 200, expected 500-599");
        // Plain HTTP to a TLS port gets no status line, and TLS to a plain port fails the
        // handshake, each with its own error.
        let plain = probe(&https_check(server.port, false, None)).await;
        assert!(plain.is_err(), "{plain:?}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((mut conn, _)) = listener.accept().await {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            }
        });
        let tls_to_plain = probe(&https_check(port, true, None)).await.unwrap_err();
        assert_eq!(tls_to_plain.metric_label(), "tls", "{tls_to_plain:?}");
    }
}
