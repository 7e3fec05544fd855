//! Conversions between `std::net::SocketAddr` and the kernel's
//! [`kmesh_abi::SockAddr`] (network byte order, IPv4 stored IPv4-mapped).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use kmesh_abi::{SockAddr, FAMILY_V4};

/// The kernel record for `addr`. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
/// gives the same record as the plain IPv4 address. Flow info and scope id
/// are not represented.
pub fn to_abi(addr: SocketAddr) -> SockAddr {
    let port = addr.port().to_be();
    match addr.ip() {
        IpAddr::V4(ip) => SockAddr::from_raw_v4(u32::from_ne_bytes(ip.octets()), port),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            SockAddr::from_raw_v6([word(0), word(4), word(8), word(12)], port)
        }
    }
}

/// The socket address of a kernel record. A [`FAMILY_V4`] record, or any
/// record holding an IPv4-mapped address, gives an IPv4 address.
pub fn from_abi(a: &SockAddr) -> SocketAddr {
    let port = u16::from_be(a.port);
    let mapped = a.addr[0] == 0 && a.addr[1] == 0 && a.addr[2] == SockAddr::V4_MAPPED_WORD;
    if a.family == FAMILY_V4 || mapped {
        let ip = Ipv4Addr::from(a.addr[3].to_ne_bytes());
        return SocketAddr::V4(SocketAddrV4::new(ip, port));
    }
    let mut o = [0u8; 16];
    for (chunk, word) in o.chunks_exact_mut(4).zip(a.addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(o), port, 0, 0))
}

/// `addr` with an IPv4-mapped IPv6 address replaced by the IPv4 address
/// (flow info and scope id cleared), so equal kernel keys compare equal here.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    from_abi(&to_abi(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_abi::FAMILY_V6;

    #[test]
    fn v4_round_trip_and_byte_order() {
        let a: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let k = to_abi(a);
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.addr[3].to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(k.addr[2], SockAddr::V4_MAPPED_WORD);
        assert_eq!(k.pad, 0);
        assert_eq!(from_abi(&k), a);
    }

    #[test]
    fn v6_round_trip() {
        let a: SocketAddr = "[fd00:10:96::a]:8443".parse().unwrap();
        let k = to_abi(a);
        assert_eq!(k.family, FAMILY_V6);
        assert_eq!(k.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0x10]);
        assert_eq!(k.port.to_ne_bytes(), [0x20, 0xfb]);
        assert_eq!(from_abi(&k), a);
    }

    #[test]
    fn v4_mapped_is_the_v4_record() {
        let mapped: SocketAddr = "[::ffff:10.244.1.2]:8080".parse().unwrap();
        let plain: SocketAddr = "10.244.1.2:8080".parse().unwrap();
        assert_eq!(to_abi(mapped), to_abi(plain));
        assert_eq!(to_abi(mapped).family, FAMILY_V4);
        assert_eq!(from_abi(&to_abi(mapped)), plain);
        assert_eq!(canonical(mapped), plain);
        // A record built by the kernel from user_ip6 agrees too.
        let k = to_abi(plain);
        assert_eq!(SockAddr::from_raw_v6(k.addr, k.port), k);
    }
}
