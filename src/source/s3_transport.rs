//! The S3 source's HTTP transport: hyper's client, as the SDK's own, with each connection's read
//! buffer bounded.
//!
//! hyper grows a connection's read buffer to about 400 KiB when reads fill it, and every body
//! chunk is a slice of that buffer, so a buffer lives as long as its last chunk. At 32 connections
//! that was a third of a folder fetch's memory (docs/performance.md "What a connection costs").
//! The SDK's client does not let hyper's limit be set; this one caps it at [`READ_BUFFER`].
//! Everything else is what the SDK's default client does: HTTP/1.1 over TLS as [`super::tls`] sets
//! it up (the system's roots, or only those of `--ca-bundle`), plain HTTP for an `http://`
//! endpoint, pooled connections, a connect timeout, and no proxy.

use std::error::Error as StdError;
use std::path::Path;
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::ErrorKind;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{SourceError, tls};

/// hyper's limit on a connection's read buffer (a read may fill the buffer's free room, which can
/// be up to twice this). At 256 KiB a fetch of everything into a folder over 32 connections peaks
/// at 51-56 MiB instead of 68-72 MiB, as fast; at 64 KiB it peaks at 30 MiB but costs 20-30% of
/// the time on a loopback store, where the CPU is the limit (docs/performance.md "What a
/// connection costs").
pub const READ_BUFFER: usize = 256 * 1024;

/// How long connections wait in the pool, as the SDK's client.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The SDK's HTTP client for the S3 source (see the module's documentation).
#[derive(Clone)]
pub struct Transport {
    client: Client<HttpsConnector<TcpConnector>, SdkBody>,
    read_buffer: usize,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("read_buffer", &self.read_buffer)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A client whose connections give up connecting after `connect_timeout`, trusting the CA
    /// certificates of `ca_bundle` (a PEM file) only, or else the system's.
    pub fn new(
        connect_timeout: Duration,
        ca_bundle: Option<&Path>,
    ) -> Result<Transport, SourceError> {
        Transport::build(
            connect_timeout,
            tls::client_config(ca_bundle, &[])?,
            READ_BUFFER,
        )
    }

    fn build(
        connect_timeout: Duration,
        tls: rustls::ClientConfig,
        read_buffer: usize,
    ) -> Result<Transport, SourceError> {
        let mut tcp = TcpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .http1_max_buf_size(read_buffer)
            .build(https);
        Ok(Transport {
            client,
            read_buffer,
        })
    }
}

impl HttpClient for Transport {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        // The one timeout the S3 source sets (connect) is the client's own, so the SDK's timeout
        // settings are not read (the source sets none); the SDK asks for a connector per
        // operation, and each gets the same pool.
        SharedHttpConnector::new(self.clone())
    }
}

impl HttpConnector for Transport {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let request = match request.try_into_http1x() {
            Ok(request) => request,
            Err(e) => return HttpConnectorFuture::ready(Err(ConnectorError::user(e.into()))),
        };
        let answer = self.client.request(request);
        HttpConnectorFuture::new(async move {
            match answer.await {
                Ok(response) => HttpResponse::try_from(response.map(SdkBody::from_body_1_x))
                    .map_err(|e| ConnectorError::other(e.into(), None)),
                Err(e) => Err(classify(e)),
            }
        })
    }
}

/// A failed exchange as the SDK's retry rules (and the S3 source's) read it: a timeout; a
/// mistake in the request; a connection that could not be made or broke (I/O, retried);
/// anything else.
fn classify(e: hyper_util::client::legacy::Error) -> ConnectorError {
    let hyper = causes(&e).find_map(|c| c.downcast_ref::<hyper::Error>());
    if hyper.is_some_and(hyper::Error::is_timeout) {
        return ConnectorError::timeout(e.into());
    }
    if hyper.is_some_and(hyper::Error::is_user) {
        return ConnectorError::user(e.into());
    }
    let broken = e.is_connect()
        || causes(&e).any(|c| c.is::<std::io::Error>())
        || hyper.is_some_and(|h| h.is_closed() || h.is_canceled() || h.is_incomplete_message());
    if broken {
        return ConnectorError::io(e.into());
    }
    ConnectorError::other(e.into(), Some(ErrorKind::ClientError))
}

/// `e` and its causes, outermost first. After an I/O error comes its payload: `io::Error::source`
/// is the payload's source, which would skip the payload (where TLS puts its error).
pub(super) fn causes<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |&c| match c.downcast_ref::<std::io::Error>() {
        Some(io) => io.get_ref().map(|p| p as &(dyn StdError + 'static)),
        None => c.source(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_io_and_retried() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Transport::new(Duration::from_secs(5), None).unwrap();
        let req = http::Request::get(format!("http://127.0.0.1:{port}/b/k"))
            .body(SdkBody::empty())
            .unwrap();
        let e = t
            .call(HttpRequest::try_from(req).unwrap())
            .await
            .unwrap_err();
        assert!(e.is_io(), "{e:?}");
        let refused = causes(&e).any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        });
        assert!(refused, "{e:?}");
    }

    #[tokio::test]
    async fn bodies_arrive_in_pieces_of_about_the_read_buffer() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A server that answers one GET with 4 MiB in one write.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let served = sent.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = vec![0u8; 4096];
            let mut n = 0;
            while !head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                n += s.read(&mut head[n..]).await.unwrap();
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                served.len()
            );
            s.write_all(answer.as_bytes()).await.unwrap();
            s.write_all(&served).await.unwrap();
        });
        // A small cap, so that hyper's default (pieces of up to about 400 KiB) would fail.
        let cap = 64 << 10;
        let tls = tls::client_config(None, &[]).unwrap();
        let t = Transport::build(Duration::from_secs(5), tls, cap).unwrap();
        let req = http::Request::get(format!("http://{addr}/b/k"))
            .body(SdkBody::empty())
            .unwrap();
        let response = t.call(HttpRequest::try_from(req).unwrap()).await.unwrap();
        let mut body = response.into_body();
        let (mut got, mut largest) = (Vec::new(), 0);
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            largest = largest.max(data.len());
            got.extend_from_slice(&data);
        }
        assert!(got == sent, "the body differs");
        // A read fills the buffer's free room, which `BytesMut` may round up past the limit.
        assert!(largest <= 2 * cap, "a piece of {largest} bytes");
    }
}
