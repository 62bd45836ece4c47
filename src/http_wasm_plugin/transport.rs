//! The Traefik plugin's callout transport: one HTTP/1.1 request per connection over the WasmEdge
//! socket extension that Traefik's wasm host provides, with TLS (rustls) for `https`.
//!
//! Envoy makes the callouts of the proxy-wasm build; in Traefik the guest makes them itself,
//! blocking its instance while it waits (Traefik keeps a pool of instances). Facts this relies
//! on (measured on Traefik 3.7.15, README "Traefik"): `nslookup` and IPv4 `connect` work from
//! `handle_request`; socket timeouts cannot be set, so sockets are non-blocking and every wait
//! is a `poll` with the callout's deadline; TLS is not provided by the host.
//!
//! Every callout gets a fresh connection (`Connection: close`): the callouts of one token
//! request go to different servers, and no connection is left open in an idle instance.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::wasi::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, StreamOwned};
use wasmedge_wasi_socket::poll::{self as wpoll, Subscription};
use wasmedge_wasi_socket::socket::{AddressFamily, Socket, SocketType};
use wasmedge_wasi_socket::TcpStream;

use crate::config::{ConfigError, TokenService};
use crate::exchange::{Callout, CalloutTarget};
use crate::http1::{self, Answer};

/// WASI errno values the socket extension returns as raw OS errors.
const WASI_EAGAIN: i32 = 6;
const WASI_EINPROGRESS: i32 = 26;

/// TLS settings for every callout of one plugin instance.
pub struct Transport {
    /// `dnsServer`: resolve names there (DNS over TCP) instead of with the host's resolver.
    dns_server: Option<std::net::SocketAddrV4>,
    verified: Arc<ClientConfig>,
    /// Only with `insecureSkipVerify` (test only): used for homeserver callouts.
    unverified: Option<Arc<ClientConfig>>,
}

impl Transport {
    /// Builds the TLS client settings from the token service configuration: Mozilla's roots
    /// (crate `webpki-roots`) plus the certificates of `caFile`, read with `read_file`.
    ///
    /// Errors (naming `caFile`) when the file cannot be read or holds no PEM certificate.
    pub fn new(
        service: &TokenService,
        read_file: &dyn Fn(&str) -> io::Result<Vec<u8>>,
    ) -> Result<Self, ConfigError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &service.ca_file {
            let pem = read_file(path).map_err(|e| {
                ConfigError::new(
                    "caFile",
                    format!("cannot read {path}: {e} (is its directory in the plugin's settings.mounts?)"),
                )
            })?;
            let mut added = 0usize;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    ConfigError::new("caFile", format!("{path} is not a PEM bundle: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    ConfigError::new(
                        "caFile",
                        format!("a certificate in {path} is unusable: {e}"),
                    )
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(ConfigError::new(
                    "caFile",
                    format!("{path} holds no PEM certificate"),
                ));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new("caFile", format!("TLS setup failed: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let unverified = if service.insecure_skip_verify {
            let config = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| {
                    ConfigError::new("insecureSkipVerify", format!("TLS setup failed: {e}"))
                })?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth();
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(Self {
            dns_server: service.dns_server,
            verified: Arc::new(verified),
            unverified,
        })
    }

    /// Makes the callout and reads its answer, the body truncated to `max_body` bytes, all
    /// within the callout's timeout.
    ///
    /// Errors with a short reason for the log (never a token): name resolution, connection,
    /// TLS (including certificate verification), timeout, or a malformed answer.
    pub fn fetch(&self, callout: &Callout, max_body: usize) -> Result<Answer, String> {
        let deadline = Instant::now() + Duration::from_millis(callout.timeout_ms);
        let (host, port) = split_authority(&callout.upstream.authority)?;
        let address = resolve(host, port, self.dns_server, deadline)?;
        let socket = connect(address, deadline)?;
        let request = http1::encode_request(callout);
        if callout.upstream.tls {
            let config = match (&self.unverified, callout.target) {
                (Some(insecure), CalloutTarget::Homeserver | CalloutTarget::WellKnown) => insecure,
                _ => &self.verified,
            };
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| format!("invalid TLS server name {host}: {e}"))?;
            let connection = ClientConnection::new(config.clone(), name)
                .map_err(|e| format!("TLS setup failed: {e}"))?;
            let mut stream = StreamOwned::new(connection, socket);
            http1::exchange(&mut stream, &request, max_body)
        } else {
            let mut stream = socket;
            http1::exchange(&mut stream, &request, max_body)
        }
    }
}

/// `host:port` (IPv6 in brackets) into its parts.
fn split_authority(authority: &str) -> Result<(&str, u16), String> {
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("no port in {authority}"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("bad port in {authority}"))?;
    Ok((host, port))
}

/// The first IPv4 address of `host`: an IPv4 literal, or a DNS name resolved by the host (its
/// `getaddrinfo`; Traefik's resolver applies its own timeouts) or, with `dns_server`, by that
/// server over TCP within the callout's deadline ([`lookup_a`]). IPv6 is refused: the socket
/// extension's client connects over IPv4 only.
fn resolve(
    host: &str,
    port: u16,
    dns_server: Option<std::net::SocketAddrV4>,
    deadline: Instant,
) -> Result<SocketAddr, String> {
    if host.starts_with('[') {
        return Err(format!(
            "{host}: IPv6 addresses cannot be reached from the Traefik plugin (IPv4 only)"
        ));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(SocketAddr::new(IpAddr::V4(ip), port));
    }
    let lower = host.to_ascii_lowercase();
    let ip = match dns_server {
        // RFC 6761 section 6.3: localhost names are loopback, whatever a DNS server says.
        Some(_) if lower == "localhost" || lower.ends_with(".localhost") => Ipv4Addr::LOCALHOST,
        Some(server) => lookup_a(server, host, deadline)?,
        None => wasmedge_wasi_socket::nslookup_with_host(host, &port.to_string())
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .into_iter()
            .find_map(|a| match a.ip() {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })
            .ok_or_else(|| format!("{host} has no IPv4 address"))?,
    };
    Ok(SocketAddr::new(IpAddr::V4(ip), port))
}

/// Largest DNS answer read over TCP, in bytes.
const MAX_DNS_ANSWER_BYTES: usize = 16 * 1024;

/// Asks `server` for the A records of `host` over TCP (RFC 7766: two-byte length, then the
/// message; messages built and parsed with the crate `simple-dns`), all before `deadline`.
/// Returns the first address.
fn lookup_a(
    server: std::net::SocketAddrV4,
    host: &str,
    deadline: Instant,
) -> Result<Ipv4Addr, String> {
    use simple_dns::{
        rdata::RData, Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, TYPE,
    };
    let failed = |e: &dyn std::fmt::Display| format!("cannot resolve {host} with {server}: {e}");
    // Any id will do over TCP to a configured server; the answer must echo it.
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let id = (nanos & 0xffff) as u16;
    let mut query = Packet::new_query(id);
    query.set_flags(PacketFlag::RECURSION_DESIRED);
    let name = Name::new(host).map_err(|e| failed(&e))?;
    query.questions.push(Question::new(
        name,
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let message = query.build_bytes_vec().map_err(|e| failed(&e))?;
    let length = u16::try_from(message.len()).map_err(|e| failed(&e))?;
    let mut stream = connect(SocketAddr::V4(server), deadline)?;
    let mut framed = length.to_be_bytes().to_vec();
    framed.extend_from_slice(&message);
    stream.write_all(&framed).map_err(|e| failed(&e))?;
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).map_err(|e| failed(&e))?;
    let size = usize::from(u16::from_be_bytes(prefix));
    if size > MAX_DNS_ANSWER_BYTES {
        return Err(failed(&"answer too large"));
    }
    let mut answer = vec![0u8; size];
    stream.read_exact(&mut answer).map_err(|e| failed(&e))?;
    let reply = Packet::parse(&answer).map_err(|e| failed(&e))?;
    if reply.id() != id {
        return Err(failed(&"answer for another query"));
    }
    reply
        .answers
        .iter()
        .find_map(|record| match &record.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .ok_or_else(|| format!("{host} has no IPv4 address (asked {server})"))
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
        || matches!(e.raw_os_error(), Some(WASI_EAGAIN | WASI_EINPROGRESS))
}

/// Waits until `fd` is readable (or writable), or the deadline passes.
fn wait(fd: &impl AsRawFd, read: bool, deadline: Instant) -> io::Result<()> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "callout timeout"));
    }
    let until = SystemTime::now() + remaining;
    let events = wpoll::poll(&[Subscription::io(0, fd, read, !read, Some(until))])?;
    for event in events {
        match event.event_type {
            wpoll::EventType::Timeout => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "callout timeout"))
            }
            wpoll::EventType::Error(e) => return Err(e),
            wpoll::EventType::Read | wpoll::EventType::Write => {}
        }
    }
    Ok(())
}

/// A non-blocking TCP connection whose reads and writes wait (with `poll`) up to a deadline,
/// so the code above it can be written as if it were blocking.
struct TimedStream {
    stream: TcpStream,
    deadline: Instant,
}

impl AsRawFd for TimedStream {
    fn as_raw_fd(&self) -> std::os::wasi::io::RawFd {
        self.stream.as_raw_fd()
    }
}

/// A count the socket extension reported that cannot be right for this buffer (seen when
/// Traefik's shared WASI system is used concurrently, README "Traefik"): an error, never a
/// slice-index panic in the caller.
fn checked(n: usize, len: usize) -> io::Result<usize> {
    if n > len {
        return Err(io::Error::other(format!(
            "socket reported {n} bytes for a {len}-byte buffer"
        )));
    }
    Ok(n)
}

impl Read for TimedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if would_block(&e) => wait(&self.stream, true, self.deadline)?,
                Ok(n) => return checked(n, buf.len()),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for TimedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.stream.write(buf) {
                Err(e) if would_block(&e) => wait(&self.stream, false, self.deadline)?,
                Ok(n) => return checked(n, buf.len()),
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn connect(address: SocketAddr, deadline: Instant) -> Result<TimedStream, String> {
    let failed = |e: io::Error| format!("connecting to {address} failed: {e}");
    let socket = Socket::new(AddressFamily::Inet4, SocketType::Stream).map_err(failed)?;
    socket.set_nonblocking(true).map_err(failed)?;
    match socket.connect(&address) {
        Ok(()) => {}
        Err(e) if would_block(&e) => wait(&socket, false, deadline).map_err(failed)?,
        Err(e) => return Err(failed(e)),
    }
    Ok(TimedStream {
        stream: TcpStream::from(socket),
        deadline,
    })
}

/// `insecureSkipVerify` (test only): accepts any certificate, still checks the handshake
/// signatures with the provider's algorithms.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
