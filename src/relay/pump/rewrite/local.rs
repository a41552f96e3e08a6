//! What transaction mode answers without a server: a batch of named Parses and a Sync.

use super::{name_str, split_cstr};
use crate::protocol;
use crate::relay::classify;
use crate::relay::pump::Pump;
use crate::server::statements::{MAX_CLIENT_BYTES, MAX_PER_CLIENT};

impl Pump {
    /// With no server held: a batch of named Parses and a Sync (libpq's `PQprepare`) is answered by the
    /// proxy, without a server — the statements are prepared on whichever server first binds or describes
    /// them (so a bad one fails there). Holding no server for it matters: a client that prepares while the
    /// share is busy would otherwise wait for a server only to parse. `Some(true)`: answered (replies are
    /// in the client buffer); `Some(false)`: not such a batch; `None`: more bytes are needed to tell.
    pub fn answer_parses(&mut self) -> Option<bool> {
        if !self.mapping() || self.cin.len() > 4 * HOLD_MAX_LOCAL {
            return Some(false);
        }
        let mut pos = 0;
        let mut count = 0;
        let mut names = Vec::new();
        loop {
            let head = self.cin.get(pos..pos + 5)?;
            let kind = head[0];
            let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            if len < 4 || len as usize > HOLD_MAX_LOCAL {
                return Some(false);
            }
            let end = pos + 1 + len as usize;
            match kind {
                b'S' if len == 4 && count > 0 => {
                    pos = end;
                    break;
                }
                b'P' => {
                    let msg = self.cin.get(pos..end)?;
                    let Some((name, tail)) = split_cstr(&msg[5..]) else { return Some(false) };
                    let Some((text, _)) = split_cstr(tail) else { return Some(false) };
                    let s = self.stmts.as_ref().expect("mapping");
                    // A name the client has, or one this batch names twice (the server says 42P05 then).
                    let taken = std::str::from_utf8(name).map_or(true, |n| s.client.get(n).is_some())
                        || names.iter().any(|r: &std::ops::Range<usize>| self.cin[r.clone()] == *name);
                    if name.is_empty()
                        || taken
                        || s.client.len() + count >= MAX_PER_CLIENT
                        || s.client.bytes() + pos + msg.len() > MAX_CLIENT_BYTES
                        || classify::classify(text, self.backslash_quotes).needs_probe()
                    {
                        return Some(false);
                    }
                    count += 1;
                    names.push(pos + 5..pos + 5 + name.len());
                    pos = end;
                }
                _ => return Some(false),
            }
        }
        let batch = self.cin.split_to(pos);
        let s = self.stmts.as_mut().expect("mapping");
        let mut at = 0;
        while at < batch.len() && batch[at] == b'P' {
            let len = i32::from_be_bytes([batch[at + 1], batch[at + 2], batch[at + 3], batch[at + 4]]) as usize;
            if let Some((name, tail)) = split_cstr(&batch[at + 5..at + 1 + len]) {
                let stmt = s.registry.intern(tail, &s.search_path);
                s.client.insert(name_str(name), stmt);
                self.s2c.extend_from_slice(&[b'1', 0, 0, 0, 4]);
            }
            at += 1 + len;
        }
        protocol::ready_for_query(&mut self.s2c, b'I');
        Some(true)
    }
}

/// Largest Parse [`Pump::answer_parses`] reads (others go to a server).
const HOLD_MAX_LOCAL: usize = 64 * 1024;
