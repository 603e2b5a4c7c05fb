//! Per-token and per-client-IP connection limits. A token usable by any number of connections
//! at once was a denial of service in nova (OSSN-0008); a slot is held by a guard that frees
//! it when the connection ends, however it ends.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Current connections per key.
#[derive(Debug, Default)]
struct Counts {
    tokens: HashMap<String, usize>,
    ips: HashMap<IpAddr, usize>,
}

/// The limits and their counters.
#[derive(Debug, Clone)]
pub struct Limits {
    per_token: usize,
    per_ip: usize,
    counts: Arc<Mutex<Counts>>,
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// Too many connections with this token.
    Token,
    /// Too many connections from this address.
    Ip,
}

/// Holds one connection's slots; dropping it frees them.
#[derive(Debug)]
pub struct Slot {
    token: String,
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Limits {
    /// Limits of `per_token` and `per_ip` concurrent connections.
    pub fn new(per_token: usize, per_ip: usize) -> Self {
        Limits {
            per_token,
            per_ip,
            counts: Arc::default(),
        }
    }

    /// Takes a slot for (token, ip), or says which limit is reached.
    pub fn acquire(&self, token: &str, ip: IpAddr) -> Result<Slot, Over> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.tokens.get(token).copied().unwrap_or(0) >= self.per_token {
            return Err(Over::Token);
        }
        if c.ips.get(&ip).copied().unwrap_or(0) >= self.per_ip {
            return Err(Over::Ip);
        }
        *c.tokens.entry(token.to_owned()).or_default() += 1;
        *c.ips.entry(ip).or_default() += 1;
        Ok(Slot {
            token: token.to_owned(),
            ip,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.tokens.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                c.tokens.remove(&self.token);
            }
        }
        if let Some(n) = c.ips.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.ips.remove(&self.ip);
            }
        }
    }
}

/// Failed token attempts per client, per minute: past the limit a client's requests are
/// refused before any lookup, so guessing tokens through the proxy costs a minute per few
/// dozen tries. IPv6 clients are counted per /64, which is what one host can cheaply hop
/// across.
#[derive(Debug)]
pub struct Guesses {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl Guesses {
    /// At most `per_minute` failed attempts per client and minute (0: no limit).
    pub fn new(per_minute: u32) -> Self {
        Guesses {
            per_minute,
            seen: Mutex::default(),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        }
    }

    /// True if the client used up its failed attempts for this minute.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&Self::key(ip))
            .is_some_and(|(start, n)| start.elapsed() < WINDOW && *n >= self.per_minute)
    }

    /// Records a failed attempt.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen.entry(Self::key(ip)).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        // Bounded memory under a spray from many addresses: forget finished windows.
        if seen.len() > 100_000 {
            seen.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_guesses_block_a_client_not_others() {
        let g = Guesses::new(3);
        let a: IpAddr = [192, 0, 2, 1].into();
        for _ in 0..3 {
            assert!(!g.blocked(a));
            g.failed(a);
        }
        assert!(g.blocked(a));
        assert!(!g.blocked([192, 0, 2, 2].into()));
        // One IPv6 /64 is one client.
        let v6 =
            |last: u16| IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
        for i in 0..3 {
            g.failed(v6(i));
        }
        assert!(g.blocked(v6(999)));
        assert!(!Guesses::new(0).blocked(a));
    }

    #[test]
    fn slots_are_counted_and_freed() {
        let l = Limits::new(2, 3);
        let ip: IpAddr = [192, 0, 2, 1].into();
        let a = l.acquire("t", ip).unwrap();
        let _b = l.acquire("t", ip).unwrap();
        assert_eq!(l.acquire("t", ip).unwrap_err(), Over::Token);
        let _c = l.acquire("u", ip).unwrap();
        assert_eq!(l.acquire("v", ip).unwrap_err(), Over::Ip);
        drop(a);
        assert!(l.acquire("t", [192, 0, 2, 2].into()).is_ok());
    }
}
