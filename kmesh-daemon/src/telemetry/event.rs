//! Kernel connection events decoded into daemon types.

use std::{net::SocketAddr, time::Duration};

use kmesh_abi::{ConnEvent, DIR_INBOUND, EVENT_CLOSE, EVENT_OPEN};
use xds_adapter::addr::from_abi;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "OUTBOUND",
            Direction::Inbound => "INBOUND",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Open,
    Close,
}

/// One connection event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub kind: Kind,
    pub direction: Direction,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The service address the client dialled, if the kernel rewrote it.
    pub orig_dst: Option<SocketAddr>,
    pub netns_cookie: u64,
    pub sock_cookie: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Duration,
    /// CLOCK_MONOTONIC ns of the event.
    pub end_ns: u64,
    pub srtt_us: u32,
    pub total_retrans: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("connection event of {0} bytes, expected {1} (daemon and kernel programs from different builds?)")]
    Size(usize, usize),
    #[error("connection event with unknown kind {0}")]
    Kind(u8),
}

impl Connection {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let want = size_of::<ConnEvent>();
        if bytes.len() < want {
            return Err(DecodeError::Size(bytes.len(), want));
        }
        // SAFETY: ConnEvent is a plain-integer #[repr(C)] type without
        // padding (kmesh-abi layout tests), so any bytes of its size are a
        // valid value; read_unaligned copes with any alignment.
        let e: ConnEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = match e.kind {
            EVENT_OPEN => Kind::Open,
            EVENT_CLOSE => Kind::Close,
            k => return Err(DecodeError::Kind(k)),
        };
        Ok(Connection {
            kind,
            direction: if e.direction == DIR_INBOUND {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            local: from_abi(&e.local),
            remote: from_abi(&e.remote),
            orig_dst: (e.has_orig_dst != 0).then(|| from_abi(&e.orig_dst)),
            netns_cookie: e.netns_cookie,
            sock_cookie: e.sock_cookie,
            bytes_sent: e.bytes_sent,
            bytes_received: e.bytes_received,
            duration: Duration::from_nanos(e.end_ns.saturating_sub(e.start_ns)),
            end_ns: e.end_ns,
            srtt_us: e.srtt_us,
            total_retrans: e.total_retrans,
        })
    }

    /// (source, destination) as Istio sees them: the client is the source.
    pub fn src_dst(&self) -> (SocketAddr, SocketAddr) {
        match self.direction {
            Direction::Outbound => (self.local, self.remote),
            Direction::Inbound => (self.remote, self.local),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_adapter::addr::to_abi;

    #[test]
    fn decodes_a_kernel_record() {
        let e = ConnEvent {
            start_ns: 1_000,
            end_ns: 3_001_000,
            bytes_sent: 5,
            bytes_received: 7,
            local: to_abi("10.244.0.2:40000".parse().unwrap()),
            remote: to_abi("10.244.0.3:8080".parse().unwrap()),
            orig_dst: to_abi("10.96.0.10:80".parse().unwrap()),
            has_orig_dst: 1,
            direction: kmesh_abi::DIR_OUTBOUND,
            kind: EVENT_CLOSE,
            ..Default::default()
        };
        // SAFETY: a plain #[repr(C)] value viewed as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const ConnEvent).cast::<u8>(),
                size_of::<ConnEvent>(),
            )
        };
        let c = Connection::decode(bytes).unwrap();
        assert_eq!(c.kind, Kind::Close);
        assert_eq!(c.orig_dst, Some("10.96.0.10:80".parse().unwrap()));
        assert_eq!(c.duration, Duration::from_millis(3));
        assert_eq!(c.src_dst().1, "10.244.0.3:8080".parse().unwrap());
        assert_eq!(
            Connection::decode(&bytes[..10]),
            Err(DecodeError::Size(10, 120))
        );
    }
}
