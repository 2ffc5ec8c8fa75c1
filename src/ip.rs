//! Client addresses: parsing, CIDR ranges, prefix aggregation and `X-Forwarded-For`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address range such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix`, or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Cidr, &'static str> {
        const EXPECTED: &str = "expected an address range such as 10.0.0.0/8 or 2001:db8::/32";
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| EXPECTED)?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or(EXPECTED)?,
        };
        Ok(Cidr {
            network: mask(addr, prefix),
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

/// Parses an address as a proxy reports it: `1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `::1`.
pub fn parse_address(bytes: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(bytes).ok()?.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok().map(canonical);
    }
    let (host, _port) = s.rsplit_once(':')?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client address from `X-Forwarded-For` when `trusted_hops` proxies in front of the
/// gateway each append the address they saw: the `trusted_hops`-th entry from the right.
/// Entries further left were written by the client and cannot be trusted.
pub fn from_forwarded_for(xff: &[u8], trusted_hops: usize) -> Option<IpAddr> {
    if trusted_hops == 0 {
        return None;
    }
    let entries: Vec<&[u8]> = xff.split(|&b| b == b',').collect();
    let entry = entries
        .len()
        .checked_sub(trusted_hops)
        .map(|i| entries[i])?;
    parse_address(entry)
}

/// `ip` reduced to its first `prefix` bits (IPv4-mapped IPv6 treated as IPv4), written
/// `addr/prefix` when aggregated and as the bare address for a whole-host prefix.
pub fn aggregate(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> String {
    let ip = canonical(ip);
    let prefix = if ip.is_ipv4() { v4_prefix } else { v6_prefix };
    let masked = mask(ip, prefix);
    if prefix == max_prefix(ip) {
        masked.to_string()
    } else {
        format!("{masked}/{prefix}")
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_membership() {
        let table = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("0.0.0.0/0", "::1", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("10.0.0.0/8", "::ffff:10.0.0.1", true),
        ];
        for (cidr, addr, inside) in table {
            assert_eq!(
                Cidr::parse(cidr).unwrap().contains(ip(addr)),
                inside,
                "{cidr} ∋ {addr}"
            );
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_as_proxies_report_them() {
        assert_eq!(parse_address(b"1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(parse_address(b"1.2.3.4:5678"), Some(ip("1.2.3.4")));
        assert_eq!(
            parse_address(b" [2001:db8::1]:443 "),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(parse_address(b"2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_address(b"::ffff:1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(parse_address(b"unknown"), None);
        assert_eq!(parse_address(b"\xff"), None);
    }

    #[test]
    fn forwarded_for_trusts_only_the_given_hops() {
        let xff = b"6.6.6.6, 1.1.1.1, 10.0.0.2";
        assert_eq!(from_forwarded_for(xff, 1), Some(ip("10.0.0.2")));
        assert_eq!(from_forwarded_for(xff, 2), Some(ip("1.1.1.1")));
        assert_eq!(from_forwarded_for(xff, 3), Some(ip("6.6.6.6")));
        assert_eq!(from_forwarded_for(xff, 4), None, "fewer entries than hops");
        assert_eq!(from_forwarded_for(xff, 0), None);
        assert_eq!(from_forwarded_for(b"garbage, 1.1.1.1", 2), None);
    }

    #[test]
    fn ipv6_clients_are_aggregated_by_prefix() {
        assert_eq!(
            aggregate(ip("2001:db8:1:2:aaaa::1"), 32, 64),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            aggregate(ip("2001:db8:1:2:bbbb::9"), 32, 64),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            aggregate(ip("2001:db8:1:3::1"), 32, 64),
            "2001:db8:1:3::/64"
        );
        assert_eq!(aggregate(ip("2001:db8::1"), 32, 128), "2001:db8::1");
        assert_eq!(aggregate(ip("10.1.2.3"), 32, 64), "10.1.2.3");
        assert_eq!(aggregate(ip("10.1.2.3"), 24, 64), "10.1.2.0/24");
        assert_eq!(aggregate(ip("::ffff:10.1.2.3"), 32, 64), "10.1.2.3");
    }
}
