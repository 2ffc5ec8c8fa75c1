//! The attribute cache: the request as rules see it, each attribute read from the host (a
//! crossing out of the VM) at most once and only when a rule needs it.

use std::cell::OnceCell;
use std::net::IpAddr;

use super::RequestView;
use crate::config::{ClientIp, ClientIpSource, Config};
use crate::ip;
use crate::rules::Descriptor;

/// Request attributes, each read from the host at most once and only when a rule needs it.
pub(super) struct Facts<'v, V> {
    pub(super) view: &'v V,
    client_ip_config: ClientIp,
    method: OnceCell<Vec<u8>>,
    /// Path without query string, and the query string.
    target: OnceCell<(Vec<u8>, Vec<u8>)>,
    /// `:authority` without port, lower-cased.
    host: OnceCell<Vec<u8>>,
    route_name: OnceCell<Option<Vec<u8>>>,
    policy: OnceCell<Option<Vec<u8>>>,
    service: OnceCell<Option<Vec<u8>>>,
    client: OnceCell<Option<Client>>,
}

/// The client as rules see it: its address, and the value the `client_ip` descriptor counts.
#[derive(Clone)]
pub(super) struct Client {
    pub(super) addr: Option<IpAddr>,
    /// The address aggregated by prefix (`2001:db8:1:2::/64`), or the raw text if unparsable.
    key: Vec<u8>,
}

impl<'v, V: RequestView> Facts<'v, V> {
    /// Nothing is read yet: every host call costs a crossing out of the VM, so each attribute
    /// is fetched on first use.
    pub(super) fn new(config: &Config, view: &'v V) -> Self {
        Facts {
            view,
            client_ip_config: config.client_ip,
            method: OnceCell::new(),
            target: OnceCell::new(),
            host: OnceCell::new(),
            route_name: OnceCell::new(),
            policy: OnceCell::new(),
            service: OnceCell::new(),
            client: OnceCell::new(),
        }
    }

    fn target(&self) -> &(Vec<u8>, Vec<u8>) {
        self.target.get_or_init(|| {
            let full = self.view.header(":path").unwrap_or_default();
            match full.iter().position(|&b| b == b'?') {
                Some(i) => (full[..i].to_vec(), full[i + 1..].to_vec()),
                None => (full, Vec::new()),
            }
        })
    }

    pub(super) fn path(&self) -> &[u8] {
        &self.target().0
    }

    fn query(&self) -> &[u8] {
        &self.target().1
    }

    pub(super) fn method(&self) -> &[u8] {
        self.method
            .get_or_init(|| self.view.header(":method").unwrap_or_default())
    }

    pub(super) fn host(&self) -> &[u8] {
        self.host.get_or_init(|| {
            let mut host = self.view.header(":authority").unwrap_or_default();
            host.truncate(strip_port(&host).len());
            host.make_ascii_lowercase();
            host
        })
    }

    pub(super) fn route_name(&self) -> &Option<Vec<u8>> {
        self.route_name.get_or_init(|| self.view.route_name())
    }

    pub(super) fn policy(&self) -> &Option<Vec<u8>> {
        self.policy.get_or_init(|| self.view.route_policy())
    }

    pub(super) fn client(&self) -> &Option<Client> {
        self.client.get_or_init(|| {
            let c = self.client_ip_config;
            let forwarded = match c.from {
                ClientIpSource::XForwardedFor => self
                    .view
                    .header("x-forwarded-for")
                    .and_then(|xff| ip::from_forwarded_for(&xff, c.trusted_hops as usize)),
                ClientIpSource::Connection => None,
            };
            // No usable X-Forwarded-For: the request did not come through the proxies, so the
            // connection's peer is the client.
            let source = self.view.source_address();
            let addr = forwarded.or_else(|| source.as_deref().and_then(ip::parse_address));
            match addr {
                Some(a) => Some(Client {
                    addr: Some(a),
                    key: ip::aggregate(a, c.ipv4_prefix, c.ipv6_prefix).into_bytes(),
                }),
                None => source.map(|s| Client {
                    addr: None,
                    key: strip_port(&s).to_vec(),
                }),
            }
        })
    }

    /// The value of one descriptor on this request, if it has one.
    pub(super) fn value(&self, d: &Descriptor) -> Option<Vec<u8>> {
        match d {
            Descriptor::Header(name) => self.view.header(name),
            Descriptor::ClientIp => self.client().as_ref().map(|c| c.key.clone()),
            Descriptor::Path => Some(self.path().to_vec()),
            Descriptor::Method => Some(self.method().to_vec()),
            Descriptor::Host => Some(self.host().to_vec()),
            Descriptor::Route => self.route_name().clone(),
            Descriptor::Service => self
                .service
                .get_or_init(|| self.view.service_name())
                .clone(),
            Descriptor::Query(name) => {
                query_param(self.query(), name.as_bytes()).map(<[u8]>::to_vec)
            }
            Descriptor::Const(value) => Some(value.as_bytes().to_vec()),
        }
    }
}

/// The first value of query parameter `name`, raw (not percent-decoded: the key encodes bytes
/// anyway, and decoding would let `a%3Db` and `a=b` spellings collide differently per client).
fn query_param<'q>(query: &'q [u8], name: &[u8]) -> Option<&'q [u8]> {
    query.split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (k == name).then_some(v)
    })
}

/// `1.2.3.4:80` → `1.2.3.4`, `[::1]:80` → `::1`, `host:8080` → `host`, a bare address unchanged.
fn strip_port(addr: &[u8]) -> &[u8] {
    if let Some(rest) = addr.strip_prefix(b"[") {
        return match rest.iter().position(|&b| b == b']') {
            Some(end) => &rest[..end],
            None => addr,
        };
    }
    let colons = addr.iter().filter(|&&b| b == b':').count();
    match addr.iter().rposition(|&b| b == b':') {
        // Exactly one colon: host:port. More than one: a bare IPv6 address.
        Some(i) if colons == 1 => &addr[..i],
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_matched_by_exact_name() {
        let q = b"a=1&ab=2&b&c=x%3Dy&a=3";
        assert_eq!(query_param(q, b"a"), Some(&b"1"[..]));
        assert_eq!(query_param(q, b"ab"), Some(&b"2"[..]));
        assert_eq!(query_param(q, b"b"), Some(&b""[..]));
        assert_eq!(query_param(q, b"c"), Some(&b"x%3Dy"[..]));
        assert_eq!(query_param(q, b"d"), None);
        assert_eq!(query_param(b"", b"a"), None);
    }

    #[test]
    fn ports_are_stripped_from_addresses() {
        let table: [(&[u8], &[u8]); 7] = [
            (b"1.2.3.4:80", b"1.2.3.4"),
            (b"1.2.3.4", b"1.2.3.4"),
            (b"[2001:db8::1]:443", b"2001:db8::1"),
            (b"2001:db8::1", b"2001:db8::1"),
            (b"[::1]", b"::1"),
            (b"example.com:8080", b"example.com"),
            (b"", b""),
        ];
        for (input, expected) in table {
            assert_eq!(strip_port(input), expected);
        }
    }
}
