//! A counting TCP relay for tests that measure what actually crosses the wire between two
//! agents: it forwards every connection to a target address unchanged (TLS passes through:
//! agents pin fingerprints, not addresses) and records, per read from the client side, the
//! time and the byte count, so a test can sum the bytes sent in any time window. Threads of
//! its own, stopped (listener and relays) when the meter is dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Every read from a client: when, and how many bytes.
type Samples = Arc<Mutex<Vec<(Instant, u64)>>>;

/// A running relay; see the module doc.
pub struct Meter {
    addr: SocketAddr,
    samples: Samples,
    stop: Arc<AtomicBool>,
}

impl Meter {
    /// Listen on 127.0.0.1 (a free port) and relay every connection to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<Meter> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let samples: Samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        let _ = client.set_nonblocking(false);
                        relay(client, server, s.clone(), st.clone());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Meter {
            addr,
            samples,
            stop,
        })
    }

    /// The address to give the client instead of the target's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every read from a client so far: when it was read and how many bytes.
    pub fn samples(&self) -> Vec<(Instant, u64)> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copy both directions of one connection; client → server reads are recorded.
fn relay(client: TcpStream, server: TcpStream, samples: Samples, stop: Arc<AtomicBool>) {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let st = stop.clone();
    thread::spawn(move || copy(client, server, Some(samples), st));
    thread::spawn(move || copy(s2, c2, None, stop));
}

fn copy(mut from: TcpStream, mut to: TcpStream, samples: Option<Samples>, stop: Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(s) = &samples {
                    s.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), n as u64));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
