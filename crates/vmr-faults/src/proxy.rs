//! A delaying TCP proxy (this kernel has no netem): listens inside a network namespace
//! (its thread enters it with setns before making any socket) and forwards each connection to
//! a target, holding every chunk for the current delay before passing it on, in both
//! directions. The delay can change while connections are open.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// A running proxy; stops (and drops its connections) on drop.
#[derive(Debug)]
pub struct DelayProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    delayed: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    /// Start a proxy listening on `ip:0` inside the namespace at `netns` (the current one when
    /// `None`), forwarding to `target`.
    pub fn start(netns: Option<&Path>, ip: &str, target: SocketAddr) -> anyhow::Result<Self> {
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delayed = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let netns = netns.map(Path::to_path_buf);
        let ip = ip.to_owned();
        let d = delay_ms.clone();
        let dl = delayed.clone();
        let thread = std::thread::spawn(move || {
            let setup = || -> anyhow::Result<(tokio::runtime::Runtime, std::net::TcpListener)> {
                if let Some(ns) = &netns {
                    let f = std::fs::File::open(ns)
                        .with_context(|| format!("open {}", ns.display()))?;
                    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns into the namespace")?;
                }
                let l = std::net::TcpListener::bind((ip.as_str(), 0))
                    .with_context(|| format!("bind the proxy on {ip}"))?;
                l.set_nonblocking(true)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok((rt, l))
            };
            let (rt, l) = match setup() {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let l = match l
                    .local_addr()
                    .and_then(|a| Ok((a, TcpListener::from_std(l)?)))
                {
                    Ok((a, l)) => {
                        let _ = ready_tx.send(Ok(a));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let accept = async {
                    loop {
                        let Ok((down, _)) = l.accept().await else {
                            continue;
                        };
                        let (d, dl) = (d.clone(), dl.clone());
                        tokio::spawn(async move {
                            // A refused or unreachable target closes the client's connection.
                            if let Ok(up) = TcpStream::connect(target).await {
                                forward(down, up, d, dl).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = ready_rx
            .recv()
            .context("the proxy thread ended before it listened")??;
        Ok(DelayProxy {
            addr,
            delay_ms,
            delayed,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Bytes forwarded with a delay so far.
    pub fn delayed_bytes(&self) -> u64 {
        self.delayed.load(Ordering::Relaxed)
    }

    /// Set the one-way delay of every chunk from now on.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn forward(down: TcpStream, up: TcpStream, delay: Arc<AtomicU64>, delayed: Arc<AtomicU64>) {
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    // Either direction ending (EOF or error) ends the connection.
    tokio::select! {
        _ = pump(dr, uw, delay.clone(), delayed.clone()) => {}
        _ = pump(ur, dw, delay, delayed) => {}
    }
}

/// Copy `r` to `w`, each chunk released `delay` after it was read.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
    delayed: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let ms = delay.load(Ordering::Relaxed);
                    if ms > 0 {
                        delayed.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let due = Instant::now() + Duration::from_millis(ms);
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    // The writer drains what the reader queued before the reader's EOF.
    let (_, ()) = tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_forwards_both_ways_and_adds_its_delay() {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let echo = rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let a = l.local_addr().expect("addr");
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut b = [0u8; 5];
                s.read_exact(&mut b).await.expect("read");
                s.write_all(&b).await.expect("write");
            });
            a
        });
        let p = DelayProxy::start(None, "127.0.0.1", echo).expect("proxy");
        p.set_delay(Duration::from_millis(150));
        let took = rt.block_on(async {
            let mut s = TcpStream::connect(p.addr).await.expect("connect");
            let t = Instant::now();
            s.write_all(b"hello").await.expect("write");
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.expect("read");
            assert_eq!(&b, b"hello");
            t.elapsed()
        });
        // 150 ms each way.
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(p.delayed_bytes(), 10);
    }
}
