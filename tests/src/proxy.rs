//! A TCP proxy on loopback that the fault runner puts between an agent and the controller, and
//! controls: it forwards bytes both ways until told to cut the link (every live connection is
//! closed at once and new ones are closed as soon as they are accepted) and to restore it; it
//! can cut each of the next N connections after a random number of bytes from the controller
//! (an artifact transfer cut short, again and again), and flip one bit of the bytes from the
//! controller on each of the next N connections (TLS must fail the record).
//!
//! It runs on a runtime of its own (one worker thread), so a synchronous test or runner drives
//! it with plain method calls. Dropping the proxy shuts the runtime down, which closes every
//! connection and the listener.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long the proxy waits to connect to its upstream before it drops a client.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read at once in each direction.
const BUFFER_BYTES: usize = 64 * 1024;

/// What the proxy does to connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward everything.
    Pass,
    /// The link is down: close every connection at once.
    Cut,
}

/// What happens to the next connections (each rule counts down per connection).
#[derive(Debug, Default)]
struct Rules {
    /// Cut each of this many next connections after a number of downstream bytes drawn from
    /// `cut_range`.
    cut_connections: u32,
    cut_range: (u64, u64),
    /// Flip one bit of the downstream bytes, at an offset drawn from `flip_range`, in each of
    /// this many next connections.
    flip_connections: u32,
    flip_range: (u64, u64),
    /// The proxy's own xorshift state, seeded by its owner.
    rng_state: u64,
}

impl Rules {
    fn draw(&mut self, (low, high): (u64, u64)) -> u64 {
        let mut x = self.rng_state.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng_state = x;
        let value = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        low + value % (high.saturating_sub(low) + 1)
    }
}

/// What the proxy did, for the runner to tell that a fault was injected.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    pub connections: AtomicU64,
    /// Connections cut after a number of bytes (a cut of the whole link is not counted).
    pub cuts: AtomicU64,
    /// Bits flipped.
    pub flips: AtomicU64,
    /// Bytes forwarded from the controller to the agent.
    pub downstream_bytes: AtomicU64,
}

struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    rules: Mutex<Rules>,
    counters: ProxyCounters,
}

/// A running proxy; see the module doc.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`; `seed` seeds the byte counts.
    pub fn start(upstream: SocketAddr, seed: u64) -> std::io::Result<Proxy> {
        Proxy::start_on(std::net::Ipv4Addr::LOCALHOST.into(), upstream, seed)
    }

    /// Like [`Proxy::start`], listening on `bind:0` (the host's end of a network namespace's
    /// link, say).
    pub fn start_on(
        bind: std::net::IpAddr,
        upstream: SocketAddr,
        seed: u64,
    ) -> std::io::Result<Proxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()?;
        let listener = runtime.block_on(TcpListener::bind((bind, 0)))?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let shared = Arc::new(Shared {
            upstream,
            mode,
            rules: Mutex::new(Rules {
                rng_state: seed | 1,
                ..Rules::default()
            }),
            counters: ProxyCounters::default(),
        });
        runtime.spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ADDR:PORT`, the URL to give an agent.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Cuts the link: every live connection is closed now and new ones right after accept.
    pub fn cut(&self) {
        self.shared.mode.send_replace(Mode::Cut);
    }

    /// Restores the link.
    pub fn restore(&self) {
        self.shared.mode.send_replace(Mode::Pass);
    }

    /// Cuts each of the next `connections` connections after between `min_bytes` and
    /// `max_bytes` bytes from the controller.
    pub fn cut_after_bytes(&self, connections: u32, min_bytes: u64, max_bytes: u64) {
        let mut rules = self.shared.rules.lock().expect("proxy rules");
        rules.cut_connections = connections;
        rules.cut_range = (min_bytes, max_bytes.max(min_bytes));
    }

    /// Flips one bit of the bytes from the controller, between `min_offset` and `max_offset`,
    /// on each of the next `connections` connections.
    pub fn flip_bytes(&self, connections: u32, min_offset: u64, max_offset: u64) {
        let mut rules = self.shared.rules.lock().expect("proxy rules");
        rules.flip_connections = connections;
        rules.flip_range = (min_offset, max_offset.max(min_offset));
    }

    /// Drops every pending cut and flip rule (live connections keep theirs).
    pub fn clear_rules(&self) {
        let mut rules = self.shared.rules.lock().expect("proxy rules");
        rules.cut_connections = 0;
        rules.flip_connections = 0;
    }

    /// Cut and flip rules not yet applied to a connection.
    pub fn pending_rules(&self) -> u32 {
        let rules = self.shared.rules.lock().expect("proxy rules");
        rules.cut_connections + rules.flip_connections
    }

    pub fn counters(&self) -> &ProxyCounters {
        &self.shared.counters
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *shared.mode.borrow() == Mode::Cut {
            drop(client);
            continue;
        }
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        let (cut_at, flip_at) = {
            let mut rules = shared.rules.lock().expect("proxy rules");
            let cut_at = (rules.cut_connections > 0).then(|| {
                rules.cut_connections -= 1;
                let range = rules.cut_range;
                rules.draw(range)
            });
            let flip_at = (rules.flip_connections > 0).then(|| {
                rules.flip_connections -= 1;
                let range = rules.flip_range;
                rules.draw(range)
            });
            (cut_at, flip_at)
        };
        tokio::spawn(forward(client, shared.clone(), cut_at, flip_at));
    }
}

/// Forwards one connection until either side closes, the link is cut, or `cut_at` downstream
/// bytes went through.
async fn forward(
    client: TcpStream,
    shared: Arc<Shared>,
    cut_at: Option<u64>,
    flip_at: Option<u64>,
) {
    let upstream = match tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(shared.upstream),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        _ => return,
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut mode = shared.mode.subscribe();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let up = async {
        let mut buf = vec![0u8; BUFFER_BYTES];
        loop {
            let n = client_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 || upstream_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; BUFFER_BYTES];
        let mut sent: u64 = 0;
        loop {
            let mut n = upstream_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if let Some(limit) = cut_at {
                let room = limit.saturating_sub(sent);
                if (n as u64) >= room {
                    n = room as usize;
                    let _ = client_write.write_all(&buf[..n]).await;
                    shared.counters.cuts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            if let Some(offset) = flip_at {
                if offset >= sent && offset < sent + n as u64 {
                    buf[(offset - sent) as usize] ^= 0x01;
                    shared.counters.flips.fetch_add(1, Ordering::Relaxed);
                }
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n as u64;
            shared
                .counters
                .downstream_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let cut = async {
        loop {
            if *mode.borrow_and_update() == Mode::Cut {
                return;
            }
            if mode.changed().await.is_err() {
                return;
            }
        }
    };
    // Whichever ends first ends the connection: both halves are dropped, so both sockets close.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An upstream that sends `len` bytes of 0xAA to each client and then closes.
    fn upstream_sending(len: usize) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(8) {
                let Ok(mut stream) = stream else { return };
                let _ = stream.write_all(&vec![0xAA; len]);
            }
        });
        addr
    }

    fn read_all(addr: SocketAddr) -> Vec<u8> {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        out
    }

    #[test]
    fn forwards_cuts_after_bytes_and_flips_one_bit() {
        let proxy = Proxy::start(upstream_sending(100_000), 7).unwrap();
        assert_eq!(read_all(proxy.addr()), vec![0xAA; 100_000]);

        proxy.cut_after_bytes(1, 1_000, 2_000);
        let cut = read_all(proxy.addr());
        assert!((1_000..=2_000).contains(&cut.len()), "{}", cut.len());
        assert!(cut.iter().all(|b| *b == 0xAA));

        proxy.flip_bytes(1, 10, 50_000);
        let flipped = read_all(proxy.addr());
        assert_eq!(flipped.len(), 100_000);
        assert_eq!(flipped.iter().filter(|b| **b != 0xAA).count(), 1);
        assert_eq!(proxy.pending_rules(), 0);
    }

    #[test]
    fn a_cut_link_closes_new_connections_until_restored() {
        let proxy = Proxy::start(upstream_sending(10), 1).unwrap();
        proxy.cut();
        assert!(read_all(proxy.addr()).is_empty());
        proxy.restore();
        assert_eq!(read_all(proxy.addr()).len(), 10);
    }
}
