//! Header lookups that work on a hyper `HeaderMap` and on the raw headers of a request head as
//! `httparse` left them, so the filters, the router and the balancers serve both the hyper
//! path and the HTTP/1 fast path (`fast`) without building a map per request there.

use http::{HeaderMap, HeaderName};

/// Read access to a request's headers by name.
pub(crate) trait Lookup {
    /// The values of the headers named `name`, in order.
    fn all<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// The value of header `name` (the first, if sent more than once).
    fn value<'a>(&'a self, name: &'a HeaderName) -> Option<&'a [u8]> {
        self.all(name).next()
    }
}

impl Lookup for HeaderMap {
    fn all<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

impl Lookup for [httparse::Header<'_>] {
    fn all<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        // Names in a `HeaderName` are lowercase; the client may have sent any case.
        let name = name.as_str();
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// What is wrong with a request's `Host` by RFC 9112 §3.2, if anything: more than one `Host`
/// field, one holding a list of hosts, or none at all in HTTP/1.1 (`requires_host`). Such a
/// request is answered 400: routing by one host while the server reads another would let a
/// request past a route's filters.
pub(crate) fn host_fault<H: Lookup + ?Sized>(
    headers: &H,
    requires_host: bool,
) -> Option<&'static str> {
    static HOST: HeaderName = http::header::HOST;
    let mut hosts = headers.all(&HOST);
    match (hosts.next(), hosts.next()) {
        (None, _) if requires_host => Some("an HTTP/1.1 request needs a Host header"),
        (None, _) => None,
        (Some(_), Some(_)) => Some("more than one Host header"),
        (Some(host), None) if host.contains(&b',') => Some("a Host header may name one host only"),
        (Some(_), None) => None,
    }
}

/// The value of cookie `name` in a request, if sent.
pub(crate) fn cookie<'a, H: Lookup + ?Sized>(headers: &'a H, name: &str) -> Option<&'a str> {
    static COOKIE: HeaderName = http::header::COOKIE;
    headers
        .all(&COOKIE)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_mapped_headers_answer_alike() {
        let head = b"GET / HTTP/1.1\r\nX-Key: one\r\ncookie: a=1; b=2\r\nx-key: two\r\n\r\n";
        let mut parsed = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut parsed);
        req.parse(head).unwrap();
        let raw: &[httparse::Header<'_>] = req.headers;
        let mut map = HeaderMap::new();
        for h in raw {
            map.append(
                HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        let key = HeaderName::from_static("x-key");
        assert_eq!(raw.all(&key).collect::<Vec<_>>(), [b"one", b"two"]);
        assert_eq!(map.all(&key).collect::<Vec<_>>(), [b"one", b"two"]);
        assert_eq!(raw.value(&HeaderName::from_static("x-none")), None);
        assert_eq!(cookie(raw, "b"), Some("2"));
        assert_eq!(cookie(&map, "b"), Some("2"));
        assert_eq!(cookie(raw, "c"), None);
    }
}
