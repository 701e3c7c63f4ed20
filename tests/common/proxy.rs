//! A TCP (or unix socket) proxy for fault tests: forwards to a real service (a registry, the
//! Docker engine), and on demand throttles, answers HTTP errors, or refuses connections.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

#[derive(Default)]
pub struct ProxyState {
    /// HTTP statuses to answer, one per new connection, before forwarding again.
    pub failures: Mutex<VecDeque<u16>>,
    /// Bytes per second from the service to the client; 0 means no limit.
    pub rate: AtomicU64,
    /// Connections are dropped at once (the service looks down).
    pub down: AtomicBool,
    pub connections: AtomicUsize,
    /// Wakes open connections so they close when `down` is set.
    kill: Notify,
}

impl ProxyState {
    pub fn fail_next(&self, statuses: &[u16]) {
        self.failures
            .lock()
            .unwrap()
            .extend(statuses.iter().copied());
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.kill.notify_waiters();
        }
    }
}

pub struct Proxy {
    pub state: Arc<ProxyState>,
    /// `127.0.0.1:<port>` for TCP, the socket path for unix.
    pub address: String,
}

/// Proxies `127.0.0.1:<free port>` to `upstream` (`host:port`).
pub async fn tcp(upstream: &str) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let state = Arc::new(ProxyState::default());
    let upstream = upstream.to_string();
    let s = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let s = s.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(server) = tokio::net::TcpStream::connect(&upstream).await {
                    serve(client, server, s).await;
                }
            });
        }
    });
    Proxy { state, address }
}

/// Proxies a new unix socket to the unix socket `upstream` (e.g. the Docker engine's).
pub async fn unix(upstream: &str) -> Proxy {
    let dir = std::env::temp_dir().join(format!("iw-proxy-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join("proxy.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let state = Arc::new(ProxyState::default());
    let upstream = upstream.to_string();
    let s = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let s = s.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(server) = tokio::net::UnixStream::connect(&upstream).await {
                    serve(client, server, s).await;
                }
            });
        }
    });
    Proxy {
        state,
        address: path.display().to_string(),
    }
}

async fn serve<C, S>(mut client: C, server: S, state: Arc<ProxyState>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    state.connections.fetch_add(1, Ordering::SeqCst);
    if state.down.load(Ordering::SeqCst) {
        return;
    }
    let failure = state.failures.lock().unwrap().pop_front();
    if let Some(status) = failure {
        // Read the request head, answer the error, close.
        let mut buf = vec![0u8; 16 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf)).await;
        let reason = match status {
            429 => "Too Many Requests",
            500 => "Internal Server Error",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let extra = if status == 429 {
            "Retry-After: 1\r\n"
        } else {
            ""
        };
        let code = if status == 429 {
            "TOOMANYREQUESTS"
        } else {
            "UNAVAILABLE"
        };
        let body =
            format!(r#"{{"errors":[{{"code":"{code}","message":"injected by the test proxy"}}]}}"#);
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = client.write_all(response.as_bytes()).await;
        let _ = client.shutdown().await;
        return;
    }
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = tokio::io::split(server);
    let up = throttled_copy(cr, sw, state.clone());
    let down = throttled_copy(sr, cw, state.clone());
    // The answer may still be on its way when the client stops sending: wait for both.
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = state.kill.notified() => {}
    }
}

/// Copies `from` to `to` at the proxy's current rate (both directions are throttled: a pull
/// reads, a push writes).
async fn throttled_copy<R, W>(mut from: R, mut to: W, state: Arc<ProxyState>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let rate = state.rate.load(Ordering::SeqCst);
        let chunk = if rate == 0 {
            buf.len()
        } else {
            (rate as usize / 10).clamp(512, buf.len())
        };
        let n = match from.read(&mut buf[..chunk]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
    let _ = to.shutdown().await;
}
