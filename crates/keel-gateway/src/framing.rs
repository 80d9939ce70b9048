//! Request smuggling guard: follows the framing of the HTTP/1 requests a client sends, as the
//! bytes are read, to find the requests that carry both `Content-Length` and
//! `Transfer-Encoding`, or `Content-Length` more than once (hyper merges equal copies). hyper frames such a request by `Transfer-Encoding` and drops the
//! length before the gateway sees it (what RFC 9112 §6.1 allows), so the gateway could not
//! otherwise refuse it; with this it answers 400 and closes the connection.
//!
//! The tracker reads each request head (with `httparse`, as hyper does), then skips the body
//! by its `Content-Length` or by its chunks, and so finds the next head. Anything it does not
//! follow — HTTP/2, CONNECT, a head it cannot parse (such as the bytes of another protocol
//! after an accepted upgrade), a head larger than the gateway accepts — turns it off for the rest of the connection: hyper's own checks still apply, and
//! the tracker never refuses a request it is not sure about.

/// Headers parsed per head at most (more turns the tracker off; hyper allows 100).
const MAX_HEADERS: usize = 128;

#[derive(Debug)]
enum State {
    /// Gathering a request head.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// In a chunked body.
    Chunk(Chunked),
    /// Not following this connection any more.
    Off,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Skipping chunk data.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// Reading trailer lines until an empty one.
    Trailers,
}

/// Follows a chunked body (RFC 9112 §7.1) as its bytes go by, to find where it ends.
#[derive(Debug)]
pub(crate) struct Chunked {
    phase: Chunk,
    /// The size or trailer line being read.
    line: Vec<u8>,
    max_line: usize,
}

/// Where a chunked body stands after some of its bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ChunkedEnd {
    /// Not ended yet: all the bytes belonged to it.
    No,
    /// It ended after this many of the bytes.
    At(usize),
    /// Not a chunked body (a bad size line, or a line longer than allowed).
    Invalid,
}

impl Chunked {
    /// A tracker at the start of a body; a size or trailer line may be `max_line` bytes long.
    pub(crate) fn new(max_line: usize) -> Chunked {
        Chunked {
            phase: Chunk::Size,
            line: Vec::new(),
            max_line,
        }
    }

    /// Follows the next bytes of the body.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> ChunkedEnd {
        let total = bytes.len();
        let mut bytes = bytes;
        while !bytes.is_empty() {
            match self.phase {
                Chunk::Data(left) => {
                    // The data, then its CRLF (read as an empty size line).
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.phase = if left == n {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    };
                }
                phase @ (Chunk::Size | Chunk::DataEnd | Chunk::Trailers) => {
                    let Some(nl) = bytes.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(bytes);
                        // A line of `max_line` bytes may still have its CR here, its LF
                        // in the next read: the same line is judged the same however cut.
                        if self.line.len() > self.max_line + 1 {
                            return ChunkedEnd::Invalid;
                        }
                        return ChunkedEnd::No;
                    };
                    self.line.extend_from_slice(&bytes[..=nl]);
                    bytes = &bytes[nl + 1..];
                    if self.line.len() > self.max_line + 2 {
                        return ChunkedEnd::Invalid;
                    }
                    // Strict, so that no party on the way can read the framing otherwise:
                    // lines end in CRLF, and an empty line comes only after chunk data and
                    // at the end.
                    let Some(text) = self.line.strip_suffix(b"\r\n") else {
                        return ChunkedEnd::Invalid;
                    };
                    if text.contains(&b'\r') {
                        return ChunkedEnd::Invalid;
                    }
                    match phase {
                        Chunk::DataEnd if text.is_empty() => self.phase = Chunk::Size,
                        Chunk::Size => match chunk_size(text) {
                            Some(0) => self.phase = Chunk::Trailers,
                            Some(n) => self.phase = Chunk::Data(n),
                            None => return ChunkedEnd::Invalid,
                        },
                        Chunk::Trailers if text.is_empty() => {
                            self.line.clear();
                            return ChunkedEnd::At(total - bytes.len());
                        }
                        Chunk::Trailers => {}
                        Chunk::DataEnd | Chunk::Data(_) => return ChunkedEnd::Invalid,
                    }
                    self.line.clear();
                }
            }
        }
        ChunkedEnd::No
    }
}

/// The size of a chunk-size line (`1a`, `1a ; name=value`): hex digits (at most 16), then
/// optional spaces or tabs and extensions.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    let blanks = rest
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count();
    let rest = &rest[blanks..];
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest[0] == b';') {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

/// What the tracker learned from the bytes of one read.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Index (from 0, in order) of a request head with both `Content-Length` and
    /// `Transfer-Encoding`.
    pub(crate) ambiguous: Option<u64>,
}

/// The framing tracker of one connection.
#[derive(Debug)]
pub(crate) struct Framing {
    state: State,
    /// Bytes of the current head or line.
    line: Vec<u8>,
    /// Request heads completed so far.
    heads: u64,
    max_head: usize,
}

impl Framing {
    pub(crate) fn new(max_head: usize) -> Framing {
        Framing {
            state: State::Head,
            line: Vec::new(),
            heads: 0,
            max_head,
        }
    }

    /// Whether it still follows the connection.
    pub(crate) fn is_on(&self) -> bool {
        !matches!(self.state, State::Off)
    }

    /// Follows `bytes`, the next bytes the client sent.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => break,
                State::Body(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::Head => {
                    // Empty lines before a request line are allowed (RFC 9112 §2.2).
                    if self.line.is_empty() {
                        let skip = bytes
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            break;
                        }
                    }
                    // The usual case: a whole head in this read, parsed where it lies.
                    if self.line.is_empty()
                        && let Some(at) = find(bytes, b"\r\n\r\n")
                    {
                        if at + 4 > self.max_head {
                            // Refused by the server as too large, however it arrives.
                            self.off();
                            break;
                        }
                        let next = self.head(&bytes[..at + 4]);
                        self.apply(next, &mut seen);
                        bytes = &bytes[at + 4..];
                        continue;
                    }
                    let before = self.line.len();
                    self.line.extend_from_slice(bytes);
                    // Look for the end of the head from a little before the new bytes.
                    let from = before.saturating_sub(3);
                    match find(&self.line[from..], b"\r\n\r\n") {
                        None => {
                            if self.line.len() > self.max_head || !could_be_head(&self.line) {
                                self.off();
                            }
                            break;
                        }
                        Some(at) => {
                            let end = from + at + 4;
                            if end > self.max_head {
                                self.off();
                                break;
                            }
                            let next = self.head(&self.line[..end]);
                            self.line.clear();
                            self.apply(next, &mut seen);
                            bytes = &bytes[(end - before).min(bytes.len())..];
                        }
                    }
                }
                State::Chunk(body) => match body.feed(bytes) {
                    ChunkedEnd::No => break,
                    ChunkedEnd::At(n) => {
                        bytes = &bytes[n..];
                        self.state = State::Head;
                    }
                    ChunkedEnd::Invalid => self.off(),
                },
            }
        }
        seen
    }

    fn off(&mut self) {
        self.state = State::Off;
        self.line = Vec::new();
    }

    /// What a complete head means for what follows.
    fn head(&self, head: &[u8]) -> Next {
        if head.starts_with(b"PRI * HTTP/2.0") {
            return Next::Off;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
            return Next::Off;
        }
        let mut length: Option<u64> = None;
        let mut lengths_differ = false;
        let mut lengths = 0;
        let mut chunked = false;
        let mut transfer_encoding = false;
        // A CONNECT is refused and ends the connection; an `Upgrade` header may be refused
        // and the connection go on.
        let connect = request.method == Some("CONNECT");
        for h in request.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                match std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                    _ => lengths_differ = true,
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // As hyper, the server behind this guard, reads a request: the last header's
                // last coding decides, and anything but `chunked` is refused. (An upstream's
                // answer is read as a client reads it instead: see `fast::answer_head`.)
                transfer_encoding = true;
                chunked = std::str::from_utf8(h.value).is_ok_and(|v| {
                    v.rsplit(',')
                        .next()
                        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
                });
            }
        }
        // Both framings, or the length given more than once (even with equal values, which
        // hyper would merge): the parties on the way may disagree about where it ends.
        if (transfer_encoding && (length.is_some() || lengths_differ)) || lengths > 1 {
            return Next::Ambiguous;
        }
        if lengths_differ || connect || (transfer_encoding && !chunked) {
            // hyper refuses these, or the protocol changes: nothing more to follow.
            return Next::Off;
        }
        // An upgrade the server may refuse: the connection would go on in HTTP/1.1, so the
        // requests after it are followed too. If it is accepted, what follows is another
        // protocol, which fails to parse as a head and turns the tracker off.
        Next::Follow(if chunked {
            State::Chunk(Chunked::new(self.max_head))
        } else {
            match length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        })
    }

    /// Counts a head and moves on as `next` says.
    fn apply(&mut self, next: Next, seen: &mut Seen) {
        match next {
            Next::Off => self.off(),
            Next::Ambiguous => {
                seen.ambiguous = Some(self.heads);
                self.heads += 1;
                self.off(); // the connection closes after this request
            }
            Next::Follow(state) => {
                self.heads += 1;
                self.state = state;
            }
        }
    }
}

/// What a parsed head leads to.
#[derive(Debug)]
enum Next {
    Follow(State),
    Ambiguous,
    Off,
}

/// Whether `partial`, the start of what should be a request head, parses so far (bytes of
/// another protocol after an accepted upgrade do not).
fn could_be_head(partial: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    !matches!(
        httparse::Request::new(&mut headers).parse(partial),
        Err(e) if e != httparse::Error::TooManyHeaders
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of every size from 1 to 16 bytes; all must agree.
    fn ambiguous(input: &[u8]) -> Vec<u64> {
        let mut answers = Vec::new();
        for step in 1..=16 {
            let mut f = Framing::new(64 * 1024);
            let mut found = Vec::new();
            for piece in input.chunks(step) {
                if let Some(i) = f.feed(piece).ambiguous {
                    found.push(i);
                }
            }
            answers.push(found);
        }
        let first = answers[0].clone();
        assert!(answers.iter().all(|a| *a == first), "{answers:?}");
        first
    }

    #[test]
    fn finds_the_ambiguous_request_among_well_framed_ones() {
        let input = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n\
POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 13\r\n\r\nContent-Lengt\
POST /d HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(ambiguous(input), vec![4]);
        let te_first =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
        assert_eq!(ambiguous(te_first), vec![0]);
        let twice = b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(ambiguous(twice), vec![1]);
        // A body that looks like headers is skipped, not read as a head.
        let body = "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n";
        let tricky = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n",
            body.len()
        );
        assert_eq!(ambiguous(tricky.as_bytes()), Vec::<u64>::new());
    }

    #[test]
    fn any_bytes_in_any_pieces_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet =
            b"\r\n:0123456789abcdefxz; ,POSTGET/HTTP1.Content-LengthTransfer-Encodingchunked";
        for _ in 0..2_000 {
            let mut f = Framing::new(512);
            let len = (next() % 400) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + (next() % 40) as usize;
                let (piece, tail) = rest.split_at(n.min(rest.len()));
                f.feed(piece);
                rest = tail;
            }
        }
    }

    #[test]
    fn stops_following_what_it_does_not_understand() {
        let mut f = Framing::new(1024);
        f.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(!f.is_on());
        let mut f = Framing::new(1024);
        f.feed(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n");
        assert!(!f.is_on());
        // An upgrade is followed on: refused, the connection goes on in HTTP/1.1 and the
        // next request is checked; accepted, the other protocol's bytes turn it off.
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let mut f = Framing::new(1024);
        f.feed(upgrade);
        assert!(f.is_on());
        let seen =
            f.feed(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(seen.ambiguous, Some(1));
        let mut f = Framing::new(1024);
        f.feed(upgrade);
        f.feed(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f]);
        assert!(!f.is_on());
        let mut f = Framing::new(64);
        f.feed(&[b'a'; 100]);
        assert!(!f.is_on());
        // A head over the limit is refused by the server, and the tracker turns off whether
        // the head came in one read or in pieces; a head at the limit is followed.
        let head = |len: usize| {
            let pad = len - "GET / HTTP/1.1\r\nX: \r\n\r\n".len();
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(pad))
        };
        for (len, on) in [(128, true), (129, false)] {
            let head = head(len);
            for step in [1, 7, 64, 128, len] {
                let mut f = Framing::new(128);
                for piece in head.as_bytes().chunks(step) {
                    f.feed(piece);
                }
                assert_eq!(f.is_on(), on, "a head of {len} in pieces of {step}");
            }
        }
        let mut f = Framing::new(1024);
        f.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert!(!f.is_on());
    }

    #[test]
    fn chunked_bodies_end_where_strict_parsers_say() {
        let body =
            b"5;ext=1\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..=body.len() {
            let mut c = Chunked::new(1024);
            let mut at = 0;
            let mut end = None;
            for piece in body.chunks(step) {
                match c.feed(piece) {
                    ChunkedEnd::No => at += piece.len(),
                    ChunkedEnd::At(n) => {
                        end = Some(at + n);
                        break;
                    }
                    ChunkedEnd::Invalid => panic!("step {step}"),
                }
            }
            assert_eq!(end, Some(body.len() - 4), "step {step}");
        }
        // A line at the length limit is judged the same whether its CRLF comes in one read
        // or is cut between CR and LF; one byte more is too long either way.
        for (extension, ok) in [(58, true), (59, false)] {
            let line = format!("0;{}\r\n\r\n", "x".repeat(extension));
            let line = line.as_bytes();
            let whole = Chunked::new(60).feed(line);
            for cut in 1..line.len() {
                let mut c = Chunked::new(60);
                let first = c.feed(&line[..cut]);
                let end = match first {
                    ChunkedEnd::No => match c.feed(&line[cut..]) {
                        ChunkedEnd::At(n) => ChunkedEnd::At(cut + n),
                        other => other,
                    },
                    other => other,
                };
                assert_eq!(end, whole, "cut at {cut}");
            }
            let expected = if ok {
                ChunkedEnd::At(line.len())
            } else {
                ChunkedEnd::Invalid
            };
            assert_eq!(whole, expected, "extension of {extension}");
        }
        for bad in [
            &b"5\r\nhello\r\n\r\n0\r\n\r\n"[..], // an extra empty line
            b"5\nhello\r\n0\r\n\r\n",            // a bare LF
            b"+5\r\nhello\r\n0\r\n\r\n",         // a sign
            b"5\r\nhelloXY0\r\n\r\n",            // no CRLF after the data
            b"11111111111111111\r\n",            // 17 hex digits
            b"5 x\r\nhello\r\n",                 // junk after the size
            b"5\r\r\nhello\r\n",                 // a bare CR
            b"5\x0c\r\nhello\r\n",               // a form feed after the size
            b"0\r\nX: 1\r\r\n\r\n",              // a bare CR in a trailer
        ] {
            let mut c = Chunked::new(1024);
            assert_eq!(
                c.feed(bad),
                ChunkedEnd::Invalid,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
