//! Client and server messages of the differential test, and the minimal synchronous raw client that sends and reads them.

use super::*;

// ---------------------------------------------------------------------------------------------------------
// Client messages

/// One frontend message.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum M {
    Query(&'static str),
    /// Parse(statement, sql)
    Parse(&'static str, &'static str),
    /// Bind(portal, statement), no parameters, text results
    Bind(&'static str, &'static str),
    /// Describe(b'S' | b'P', name)
    Describe(u8, &'static str),
    /// Execute(portal, row limit)
    Execute(&'static str, i32),
    /// Close(b'S' | b'P', name)
    Close(u8, &'static str),
    Flush,
    Sync,
    /// FunctionCall of int4abs with one text argument
    Func(&'static str),
    CopyData(&'static str),
    CopyDone,
    CopyFail,
}

impl fmt::Debug for M {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            M::Query(q) => write!(f, "Q{q:?}"),
            M::Parse(n, q) => write!(f, "P({n:?},{q:?})"),
            M::Bind(p, s) => write!(f, "B({p:?}<-{s:?})"),
            M::Describe(k, n) => write!(f, "D({}{n:?})", *k as char),
            M::Execute(p, l) => write!(f, "E({p:?},{l})"),
            M::Close(k, n) => write!(f, "C({}{n:?})", *k as char),
            M::Flush => write!(f, "H"),
            M::Sync => write!(f, "S"),
            M::Func(a) => write!(f, "F(int4abs {a:?})"),
            M::CopyData(d) => write!(f, "d{d:?}"),
            M::CopyDone => write!(f, "c"),
            M::CopyFail => write!(f, "f"),
        }
    }
}

pub(crate) fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Type byte and body of `m`; `func_oid` is int4abs.
pub(crate) fn encode(m: &M, func_oid: u32) -> (u8, Vec<u8>) {
    let mut b = Vec::new();
    let kind = match m {
        M::Query(q) => {
            cstr(&mut b, q);
            b'Q'
        }
        M::Parse(n, q) => {
            cstr(&mut b, n);
            cstr(&mut b, q);
            b.extend_from_slice(&0i16.to_be_bytes());
            b'P'
        }
        M::Bind(p, s) => {
            cstr(&mut b, p);
            cstr(&mut b, s);
            b.extend_from_slice(&[0; 6]); // no parameter formats, no parameters, no result formats
            b'B'
        }
        M::Describe(k, n) => {
            b.push(*k);
            cstr(&mut b, n);
            b'D'
        }
        M::Execute(p, l) => {
            cstr(&mut b, p);
            b.extend_from_slice(&l.to_be_bytes());
            b'E'
        }
        M::Close(k, n) => {
            b.push(*k);
            cstr(&mut b, n);
            b'C'
        }
        M::Flush => b'H',
        M::Sync => b'S',
        M::Func(a) => {
            b.extend_from_slice(&func_oid.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes()); // one argument format code: text
            b.extend_from_slice(&0i16.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes()); // one argument
            b.extend_from_slice(&(a.len() as i32).to_be_bytes());
            b.extend_from_slice(a.as_bytes());
            b.extend_from_slice(&0i16.to_be_bytes()); // text result
            b'F'
        }
        M::CopyData(d) => {
            b.extend_from_slice(d.as_bytes());
            b'd'
        }
        M::CopyDone => b'c',
        M::CopyFail => {
            cstr(&mut b, "end");
            b'f'
        }
    };
    (kind, b)
}

pub(crate) fn frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

// ---------------------------------------------------------------------------------------------------------
// Server messages

pub(crate) struct Srv {
    pub(crate) kind: u8,
    pub(crate) body: Vec<u8>,
}

impl Srv {
    pub(crate) fn first(&self) -> Option<u8> {
        self.body.first().copied()
    }

    /// Severity (non-localized if present), SQLSTATE and message of an ErrorResponse/NoticeResponse.
    pub(crate) fn fields(&self) -> (String, String, String) {
        let (mut sev, mut code, mut text) = (String::new(), String::new(), String::new());
        for f in self.body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
            let v = String::from_utf8_lossy(&f[1..]).into_owned();
            match f[0] {
                b'V' => sev = v,
                b'S' if sev.is_empty() => sev = v,
                b'C' => code = v,
                b'M' => text = v,
                _ => {}
            }
        }
        (sev, code, text)
    }

    pub(crate) fn fatal(&self) -> bool {
        self.kind == b'E' && matches!(self.fields().0.as_str(), "FATAL" | "PANIC")
    }

    /// First column of a DataRow, as text.
    pub(crate) fn first_value(&self) -> Option<String> {
        let b = &self.body;
        if b.len() < 6 || u16::from_be_bytes([b[0], b[1]]) == 0 {
            return None;
        }
        let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
        let v = b.get(6..6 + usize::try_from(len).ok()?)?;
        Some(String::from_utf8_lossy(v).into_owned())
    }
}

impl fmt::Debug for Srv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.kind as char;
        match self.kind {
            b'E' | b'N' => {
                let (sev, code, text) = self.fields();
                write!(f, "{k}[{sev} {code} {text}]")
            }
            b'Z' => write!(f, "Z({})", self.first().map(char::from).unwrap_or('?')),
            b'C' => write!(f, "C({})", String::from_utf8_lossy(self.body.strip_suffix(&[0]).unwrap_or(&self.body))),
            b'D' => match self.first_value() {
                Some(v) if v.starts_with("probe") => write!(f, "D({v})"),
                _ => write!(f, "D"),
            },
            _ => write!(f, "{k}"),
        }
    }
}

pub(crate) enum ReadErr {
    Timeout,
    Closed,
    Io(io::Error),
}

impl fmt::Display for ReadErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadErr::Timeout => write!(f, "no server message within {READ_TIMEOUT:?}"),
            ReadErr::Closed => write!(f, "the server closed the connection"),
            ReadErr::Io(e) => write!(f, "read error: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// A minimal synchronous raw client

pub(crate) struct Conn {
    pub(crate) r: BufReader<TcpStream>,
    pub(crate) w: TcpStream,
    /// Status of the last ReadyForQuery read from this connection.
    pub(crate) last_status: u8,
}

impl Conn {
    /// Log in, waiting (up to 30 s) while Postgres restarts after a backend crash.
    pub(crate) fn open(port: u16) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Self::login(port) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("login: {e}"),
            }
        }
    }

    pub(crate) fn login(port: u16) -> Result<Conn, String> {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let w = s.try_clone().unwrap();
        let mut c = Conn { r: BufReader::with_capacity(1 << 16, s), w, last_status: b'I' };
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for s in ["user", "postgres", "database", "postgres", "client_encoding", "UTF8"] {
            cstr(&mut body, s);
        }
        body.push(0);
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        c.w.write_all(&startup).map_err(|e| format!("write: {e}"))?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = c.read().map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            match m.kind {
                b'R' => match i32::from_be_bytes(m.body[..4].try_into().unwrap()) {
                    0 => {}
                    10 => {
                        let sc = ScramSha256::new(PG_PASSWORD.as_bytes(), ChannelBinding::unsupported());
                        let mut b = b"SCRAM-SHA-256\0".to_vec();
                        b.extend_from_slice(&(sc.message().len() as i32).to_be_bytes());
                        b.extend_from_slice(sc.message());
                        frame(&mut out, b'p', &b);
                        scram = Some(sc);
                    }
                    11 => {
                        let sc = scram.as_mut().expect("SASLContinue after SASL");
                        sc.update(&m.body[4..]).unwrap();
                        frame(&mut out, b'p', sc.message());
                    }
                    12 => scram.as_mut().expect("SASLFinal after SASL").finish(&m.body[4..]).unwrap(),
                    code => panic!("unexpected authentication request {code}"),
                },
                b'E' => return Err(format!("{m:?}")),
                b'Z' => return Ok(c),
                _ => {}
            }
            if !out.is_empty() {
                c.w.write_all(&out).map_err(|e| format!("write: {e}"))?;
            }
        }
    }

    pub(crate) fn read(&mut self) -> Result<Srv, ReadErr> {
        let map = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ReadErr::Timeout,
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                ReadErr::Closed
            }
            _ => ReadErr::Io(e),
        };
        let mut h = [0u8; 5];
        self.r.read_exact(&mut h).map_err(map)?;
        let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if len < 4 {
            return Err(ReadErr::Io(io::Error::new(io::ErrorKind::InvalidData, format!("message length {len}"))));
        }
        let mut body = vec![0u8; len as usize - 4];
        self.r.read_exact(&mut body).map_err(map)?;
        if h[0] == b'Z' {
            self.last_status = body.first().copied().unwrap_or(b'?');
        }
        Ok(Srv { kind: h[0], body })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.w.shutdown(std::net::Shutdown::Both);
    }
}
