//! The operations endpoint: `/healthz` (the process serves), `/readyz` (broker connected and
//! engine reachable), `/metrics` (Prometheus). GET only, one request per connection: a probe and
//! a scraper need no more, and it keeps an HTTP server framework out of the dependencies.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Largest request head read; probes send a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, &metrics)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn respond(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => {
            let (broker, engine) = (metrics.broker_up(), metrics.engine_up());
            let mut body = format!("broker: {}\nengine: {}\n", up(broker), up(engine));
            // Once SIGTERM came, the worker takes no job: a load balancer or the kubelet
            // should stop counting it even while its broker session finishes.
            let draining = metrics.draining();
            if draining {
                body.push_str("draining\n");
            }
            if broker && engine && !draining {
                ("200 OK", "text/plain", body)
            } else {
                ("503 Service Unavailable", "text/plain", body)
            }
        }
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn up(b: bool) -> &'static str {
    if b { "up" } else { "down" }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, metrics.clone(), stop.clone()));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK"));
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(not_ready.ends_with("broker: down\nengine: down\n"));
        metrics.set_broker_up(true);
        metrics.set_engine_up(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200 OK"));
        metrics.set_draining();
        let draining = get(addr, "/readyz").await;
        assert!(draining.starts_with("HTTP/1.1 503"), "{draining}");
        assert!(
            draining.ends_with("broker: up\nengine: up\ndraining\n"),
            "{draining}"
        );
        let m = get(addr, "/metrics").await;
        assert!(m.contains("image_worker_broker_up 1"), "{m}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
    }
}
