//! HTTPS test servers: a throwaway CA, a leaf for 127.0.0.1 and localhost, HTTP/2 and HTTP/1.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::rustls;

/// One request as a fake provider sees it, body read in full.
#[derive(Debug, Clone)]
pub struct Request {
    /// `POST`, ...
    pub method: hyper::Method,
    /// Path and query.
    pub path: String,
    /// The HTTP version the client used.
    pub version: hyper::Version,
    /// The request headers.
    pub headers: hyper::HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// What a fake answers.
pub type Answer = Response<Full<Bytes>>;

/// A fake's request handler.
pub type Handler = Arc<dyn Fn(Request) -> Answer + Send + Sync>;

/// An answer with a status, headers and a body.
pub fn answer(status: u16, headers: &[(&str, String)], body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = StatusCode::from_u16(status).expect("valid status");
    for (name, value) in headers {
        response.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            value.parse().expect("header value"),
        );
    }
    response
}

/// A running HTTPS server and the files a client needs to trust it.
pub struct Server {
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// PEM of the test CA that signed the server's certificate: a channel's `ca_file`.
    pub ca_file: PathBuf,
    /// Holds `ca_file` and whatever else the fake writes.
    pub dir: tempfile::TempDir,
}

/// Starts an HTTPS server on a free port of 127.0.0.1, answering with `handler`.
pub async fn serve(handler: Handler) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca_pem, chain, key) = certificates();
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write ca file");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let request = Request {
                                method: parts.method,
                                path: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                version: parts.version,
                                headers: parts.headers,
                                body,
                            };
                            Ok::<_, Infallible>(handler(request))
                        }
                    },
                );
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    Server {
        url: format!("https://127.0.0.1:{}", addr.port()),
        ca_file,
        dir,
    }
}

/// A fresh CA and a leaf it signed for 127.0.0.1 and localhost.
fn certificates() -> (
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "walpush test ca");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca certificate");

    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("leaf params");
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca)
        .expect("leaf certificate");

    let chain = vec![leaf.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    (ca.pem(), chain, key)
}
