//! Where each gateway keeps the request attributes Tollgate reads, as proxy-wasm property
//! paths. Envoy and Kong (ngx_wasm_module) name them differently; the first path that answers
//! wins, so one `.wasm` runs on both.

/// The matched route's name: Envoy `xds.route_name` (the bare `route_name` answers nothing in
/// Envoy 1.40), Kong `kong.route_name`.
pub const ROUTE_NAME: &[&[&str]] = &[&["xds", "route_name"], &["kong", "route_name"]];

/// The upstream service: Envoy's cluster, Kong's service.
pub const SERVICE_NAME: &[&[&str]] = &[&["xds", "cluster_name"], &["kong", "service_name"]];

/// The route's Tollgate policy from Envoy route metadata (`filter_metadata.tollgate.policy`;
/// strings come back raw). Kong routes carry no such metadata: use `match.routes` there.
pub const ROUTE_POLICY: &[&[&str]] = &[&[
    "xds",
    "route_metadata",
    "filter_metadata",
    "tollgate",
    "policy",
]];

/// The downstream peer (`ip:port`); the same path on both gateways.
pub const SOURCE_ADDRESS: &[&[&str]] = &[&["source", "address"]];

/// The first non-empty value among `paths`, read with `get`.
pub fn first(paths: &[&[&str]], get: impl Fn(&[&str]) -> Option<Vec<u8>>) -> Option<Vec<u8>> {
    paths.iter().find_map(|p| get(p).filter(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn host(props: &[(&[&str], &str)]) -> impl Fn(&[&str]) -> Option<Vec<u8>> {
        let map: HashMap<Vec<String>, Vec<u8>> = props
            .iter()
            .map(|(p, v)| {
                (
                    p.iter().map(|s| s.to_string()).collect(),
                    v.as_bytes().to_vec(),
                )
            })
            .collect();
        move |path: &[&str]| {
            map.get(&path.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .cloned()
        }
    }

    #[test]
    fn envoy_properties() {
        let envoy = host(&[
            (&["xds", "route_name"], "search"),
            (&["xds", "cluster_name"], "search_backend"),
            (
                &[
                    "xds",
                    "route_metadata",
                    "filter_metadata",
                    "tollgate",
                    "policy",
                ],
                "search",
            ),
            (&["source", "address"], "10.0.0.1:5000"),
        ]);
        assert_eq!(first(ROUTE_NAME, &envoy), Some(b"search".to_vec()));
        assert_eq!(
            first(SERVICE_NAME, &envoy),
            Some(b"search_backend".to_vec())
        );
        assert_eq!(first(ROUTE_POLICY, &envoy), Some(b"search".to_vec()));
        assert_eq!(
            first(SOURCE_ADDRESS, &envoy),
            Some(b"10.0.0.1:5000".to_vec())
        );
    }

    #[test]
    fn kong_properties() {
        let kong = host(&[
            (&["kong", "route_name"], "search"),
            (&["kong", "service_name"], "search-api"),
            (&["source", "address"], "10.0.0.1:5000"),
        ]);
        assert_eq!(first(ROUTE_NAME, &kong), Some(b"search".to_vec()));
        assert_eq!(first(SERVICE_NAME, &kong), Some(b"search-api".to_vec()));
        assert_eq!(first(ROUTE_POLICY, &kong), None);
    }

    #[test]
    fn empty_values_fall_through() {
        let both = host(&[(&["xds", "route_name"], ""), (&["kong", "route_name"], "r")]);
        assert_eq!(first(ROUTE_NAME, &both), Some(b"r".to_vec()));
    }
}
