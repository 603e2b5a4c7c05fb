//! Per-token and per-client-IP connection limits. A token usable by any number of connections
//! at once was a denial of service in nova (OSSN-0008); a slot is held by a guard that frees
//! it when the connection ends, however it ends.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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

#[cfg(test)]
mod tests {
    use super::*;

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
