//! Whose sockets listen on an RFB port, asked of the kernel's sock_diag netlink interface (what
//! `ss` uses; /proc/net/tcp walks every hash bucket of the host's TCP tables, milliseconds on
//! a large machine, and is the fallback): the agent reports a desktop READY only
//! when every listener on its port belongs to the Xvnc it started. A desktop user can bind a
//! free port before Xvnc does (the port is visible in the helper's arguments), or hold
//! `[::]:PORT` with `IPV6_V6ONLY` beside Xvnc's `0.0.0.0:PORT`; either would put the browser in
//! front of the user's fake desktop.
use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

/// A listening TCP socket as /proc/net lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Listener {
    /// Socket inode, as `/proc/PID/fd/*` names it (`socket:[N]`).
    pub(super) inode: u64,
    /// Owner of the socket.
    pub(super) uid: u32,
}

/// True when `port` can be bound on every address family: a dual-stack bind of `[::]:PORT`
/// (IPV6_V6ONLY cleared explicitly, whatever `net.ipv6.bindv6only` says) fails if anyone
/// holds it on IPv4 or IPv6; without IPv6, `0.0.0.0:PORT` alone.
pub(super) fn port_free(port: u16) -> bool {
    match bind_dual_stack(port) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => false,
        // No IPv6 on this host (EAFNOSUPPORT, EADDRNOTAVAIL): IPv4 is all there is.
        Err(_) => TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).is_ok(),
    }
}

fn bind_dual_stack(port: u16) -> io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    s.listen(1)
}

/// A /proc table, read in large chunks: a proc file has no size, and reading it the way
/// `read_to_string` does (a 32-byte probe, then doubling) costs a syscall per small chunk,
/// each regenerating part of the table.
fn read_table(path: &str) -> io::Result<String> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(256 * 1024);
    fs::File::open(path)?.read_to_end(&mut buf)?;
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Every listening TCP socket on `port`, IPv4 and IPv6, in this network namespace: from
/// sock_diag, which walks only the listening sockets of that port (tens of microseconds),
/// or, where netlink is not allowed, from /proc/net.
pub(super) fn listeners_on(port: u16) -> io::Result<Vec<Listener>> {
    match sock_diag::listeners_on(port) {
        Ok(l) => Ok(l),
        Err(e) => {
            // Once at warn (a unit without AF_NETLINK, a kernel without inet_diag): each start
            // then costs milliseconds more on a big host; later at debug.
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "sock_diag unavailable (allow AF_NETLINK in the unit's RestrictAddressFamilies); reading /proc/net/tcp instead, slower on large hosts");
            } else {
                tracing::debug!(error = %e, "sock_diag unavailable; reading /proc/net");
            }
            listeners_in_proc(port)
        }
    }
}

/// [`listeners_on`] from /proc/net/tcp and tcp6.
fn listeners_in_proc(port: u16) -> io::Result<Vec<Listener>> {
    let mut out = parse_listeners(&read_table("/proc/net/tcp")?, port);
    // A kernel without IPv6 has no tcp6 table, and nothing can listen there.
    if let Ok(text) = read_table("/proc/net/tcp6") {
        out.extend(parse_listeners(&text, port));
    }
    Ok(out)
}

/// The socket inodes process `pid` holds open.
pub(super) fn socket_inodes(pid: u32) -> io::Result<HashSet<u64>> {
    let mut out = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(link) = entry.and_then(|e| fs::read_link(e.path())) else {
            continue;
        };
        if let Some(inode) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            out.insert(inode);
        }
    }
    Ok(out)
}

/// Why the listeners on `port` do not all belong to `pid`, if they do not.
pub(super) fn foreign_listener(pid: u32, port: u16) -> Option<String> {
    let listeners = match listeners_on(port) {
        Ok(l) => l,
        Err(e) => return Some(format!("cannot read /proc/net/tcp: {e}")),
    };
    let own = match socket_inodes(pid) {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot read the sockets of Xvnc (pid {pid}): {e}")),
    };
    if !listeners.iter().any(|l| own.contains(&l.inode)) {
        return Some(format!("Xvnc (pid {pid}) does not listen on port {port}"));
    }
    let strangers: Vec<u32> = listeners
        .iter()
        .filter(|l| !own.contains(&l.inode))
        .map(|l| l.uid)
        .collect();
    (!strangers.is_empty()).then(|| {
        format!(
            "another program (uid {}) also listens on port {port}",
            strangers
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The kernel's socket dump for TCP listeners of one port (NETLINK_SOCK_DIAG, inet_diag).
mod sock_diag {
    use super::Listener;
    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
    use std::io;

    /// Listening TCP sockets on `port`, both families. The kernel filters by state and
    /// source port for listeners, so only that port's listeners are visited.
    pub(super) fn listeners_on(port: u16) -> io::Result<Vec<Listener>> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut out = Vec::new();
        for (family, mut id) in [
            (AF_INET, SocketId::new_v4()),
            (AF_INET6, SocketId::new_v6()),
        ] {
            id.source_port = port;
            dump(&socket, family, id, port, &mut out)?;
        }
        Ok(out)
    }

    fn dump(
        socket: &Socket,
        family: u8,
        id: SocketId,
        port: u16,
        out: &mut Vec<Listener>,
    ) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id: id,
            })
            .into(),
        );
        packet.finalize();
        let mut request = vec![0; packet.buffer_len()];
        packet.serialize(&mut request);
        socket.send(&request, 0)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let size = socket.recv(&mut &mut buf[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..size])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    // Filtered by the kernel for listeners; checked again all the same.
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                        if r.header.socket_id.source_port == port =>
                    {
                        out.push(Listener {
                            inode: u64::from(r.header.inode),
                            uid: r.header.uid,
                        });
                    }
                    // A dump's own failure (tcp_diag not loadable, …) is in its DONE message.
                    NetlinkPayload::Done(d) if d.code != 0 => {
                        return Err(io::Error::from_raw_os_error(-d.code));
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    // Any error, for either family, falls back to /proc: never "nobody listens"
                    // for a table that could not be read (that is where a squatter would hide).
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
                // Messages are 4-byte aligned; a zero length would never advance.
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "empty netlink message",
                    ));
                }
                offset += (len + 3) & !3;
            }
        }
    }
}

/// The LISTEN rows for `port` of a /proc/net/tcp or tcp6 table: `sl local_address
/// rem_address st tx:rx tr:when retrnsmt uid timeout inode …`, the port in hex after the colon.
fn parse_listeners(table: &str, port: u16) -> Vec<Listener> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            if u16::from_str_radix(local_port, 16).ok()? != port || *f.get(3)? != "0A" {
                return None;
            }
            Some(Listener {
                uid: f.get(7)?.parse().ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listen_rows_of_both_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:170C 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:170C 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1001        0 4243 1 0000000000000000 20 4 30 10 -1\n\
   2: 00000000:170D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_listeners(v4, 5900),
            vec![Listener {
                inode: 4242,
                uid: 1001
            }]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000000000000:170C 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 777 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_listeners(v6, 5900),
            vec![Listener {
                inode: 777,
                uid: 1002
            }]
        );
        assert!(parse_listeners("header\ngarbage line\n", 5900).is_empty());
    }

    /// The check's two sources agree, for an IPv4 listener and a V6ONLY IPv6 one beside it on
    /// the same port (the squat the check exists for), and for a port nobody listens on.
    #[test]
    fn sock_diag_and_proc_see_the_same_listeners() {
        use socket2::{Domain, Socket, Type};
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = Socket::new(Domain::IPV6, Type::STREAM, None)
            .ok()
            .and_then(|s| {
                s.set_only_v6(true).ok()?;
                s.bind(&SocketAddr::from((Ipv6Addr::LOCALHOST, port)).into())
                    .ok()?;
                s.listen(1).ok()?;
                Some(s)
            });
        let sorted = |mut l: Vec<Listener>| {
            l.sort_by_key(|l| l.inode);
            l
        };
        let diag = sorted(sock_diag::listeners_on(port).expect("sock_diag"));
        let proc = sorted(listeners_in_proc(port).expect("/proc/net"));
        assert_eq!(diag, proc);
        assert_eq!(diag.len(), 1 + usize::from(v6.is_some()), "{diag:?}");
        let own = socket_inodes(std::process::id()).unwrap();
        assert!(diag.iter().all(|l| own.contains(&l.inode)));
        drop((v4, v6));
        assert!(sock_diag::listeners_on(port).expect("sock_diag").is_empty());
    }

    #[test]
    fn a_listener_of_this_process_is_found_and_owned() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(foreign_listener(std::process::id(), port), None);
        assert!(!port_free(port));
        // Another process's view: pid 1 holds none of our sockets.
        assert!(foreign_listener(1, port).is_some());
    }
}
