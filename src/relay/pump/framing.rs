//! Client bytes to server messages: frame by the 5-byte header, check type and length, hold what must be read
//! whole (up to `max_query_size`), stream the rest, and hand whole messages to the read-only filter and
//! transaction mode's rewrite.

use super::{rewrite, Event, Pump, PumpError, BIND_HEAD, BUF, HOLD_MAX, WINDOW};
use crate::relay::frame;
use crate::relay::txstate::MAX_OUTSTANDING;
use bytes::Buf;

impl Pump {
    /// Move framed client messages from `cin` to `c2s`. Returns `Some(Terminate)` when the client ends.
    pub(super) fn frame_client(&mut self) -> Result<(bool, Option<Event>), PumpError> {
        let mut moved = false;
        loop {
            if self.body_left > 0 {
                let n = self.body_left.min(self.cin.len()).min((BUF * 2).saturating_sub(self.c2s.len()));
                if n == 0 {
                    return Ok((moved, None));
                }
                self.c2s.extend_from_slice(&self.cin[..n]);
                self.cin.advance(n);
                self.body_left -= n;
                moved = true;
                continue;
            }
            // Client messages wait while a shape check runs (one round trip after a re-prepare).
            if self.stmts.as_ref().is_some_and(|s| s.holding) {
                return Ok((moved, None));
            }
            if self.unanswered >= WINDOW / 2 && self.held_for_answer() {
                return Ok((moved, None));
            }
            if self.c2s.len() >= BUF || self.tx.outstanding() >= MAX_OUTSTANDING || self.cin.len() < 5 {
                return Ok((moved, None));
            }
            let kind = self.cin[0];
            let len = i32::from_be_bytes([self.cin[1], self.cin[2], self.cin[3], self.cin[4]]);
            let limit = frame::client_limit(kind).ok_or(PumpError::BadType(kind as char))?;
            if len < 4 || len as usize - 4 > limit {
                return Err(PumpError::BadLength { kind: kind as char, len: len as i64 });
            }
            let body = len as usize - 4;
            // A read-only route looks between any two transactions: while a ReadyForQuery is owed, nothing that
            // could start the next one goes to the server, so the report of that ReadyForQuery (with the
            // ParameterStatus the tripwire watches) is read first. COPY data, Flush and Terminate still pass.
            if self.ro.is_some() && self.tx.awaits_ready() && !matches!(kind, b'X' | b'H' | b'c' | b'd' | b'f') {
                return Ok((moved, None));
            }
            let txn = self.stmts.is_some();
            let ro = self.ro.is_some() && matches!(kind, b'Q' | b'P' | b'B' | b'F' | b'S');
            let held = matches!(kind, b'D' | b'X')
                || ro
                || (txn
                    && match kind {
                        b'C' => true,
                        b'Q' | b'B' => body <= HOLD_MAX,
                        // A Parse is read whole (to rename it, or to keep the text of the unnamed statement for
                        // the client's next server), unless it is over max_query_size and unnamed.
                        b'P' if body > self.max_query_size => {
                            if self.cin.len() < 6 {
                                self.need = 6;
                                return Ok((moved, None));
                            }
                            self.cin[5] != 0
                        }
                        b'P' => true,
                        _ => false,
                    });
            if !held {
                self.need = 0;
                if matches!(kind, b'Q' | b'E' | b'F') {
                    self.queries += 1;
                }
                let mut head = 0;
                if txn && matches!(kind, b'Q' | b'P') {
                    self.probe_due = true; // too large to read: whatever it did is read off the server
                } else if txn && kind == b'B' {
                    let want = 5 + body.min(BIND_HEAD);
                    if self.cin.len() < want {
                        self.need = want;
                        return Ok((moved, None));
                    }
                    self.need = 0;
                    let cin = std::mem::take(&mut self.cin);
                    let r = self.bind_head(&cin[5..want], body);
                    self.cin = cin;
                    head = r?.unwrap_or(0);
                } else if kind == b'E'
                    && body > 0
                    && self.cin.len() < 6
                    && self.stmts.as_ref().is_some_and(|s| s.portal_deallocates)
                {
                    // Whether this Execute runs the `DEALLOCATE ALL` depends on its portal name's first byte.
                    self.need = 6;
                    return Ok((moved, None));
                }
                if head > 0 {
                    self.cin.advance(5 + head);
                    self.body_left = body - head;
                } else {
                    self.c2s.extend_from_slice(&self.cin[..5]);
                    self.cin.advance(5);
                    self.body_left = body;
                    match (kind, self.stmts.as_deref_mut()) {
                        // The client's unnamed statement is now one whose text the proxy does not hold: on this
                        // server it is the client's; on its next, none is (as after a Close).
                        (b'P', Some(s)) => {
                            s.close_unnamed();
                            self.tx.client_tagged(kind, None, rewrite::UNNAMED_PARSE);
                        }
                        // The Execute of a `DEALLOCATE ALL` (or `DISCARD ALL`) by extended protocol: of the
                        // unnamed portal that was bound to it (its name, empty, is the body's first byte).
                        (b'E', Some(s)) if s.portal_deallocates && self.cin.first() == Some(&0) => {
                            s.portal_deallocates = false;
                            let all = rewrite::Action::DeallocateAll { failed: Default::default(), extended: true };
                            let tag = self.actions.push(all);
                            self.tx.client_tagged(kind, None, tag);
                        }
                        _ => self.tx.client(kind, None),
                    }
                    rewrite::settle(&mut self.tx, &mut self.actions, self.stmts.as_deref_mut());
                }
                moved = true;
                continue;
            }
            if body > self.max_query_size {
                return Err(PumpError::TooLarge { kind: kind as char, len: body, max: self.max_query_size });
            }
            let total = 5 + body;
            if self.cin.len() < total {
                self.need = total;
                return Ok((moved, None));
            }
            self.need = 0;
            if kind == b'X' {
                self.cin.advance(total);
                return Ok((moved, Some(Event::Terminate)));
            }
            if kind == b'Q' {
                self.queries += 1;
            }
            let cin = std::mem::take(&mut self.cin);
            let r = self.forward_held(&cin[..total], ro, txn);
            self.cin = cin;
            if !r? {
                return Ok((true, None));
            }
            self.cin.advance(total);
            moved = true;
        }
    }

    /// Forward one whole client message: through the read-only filter, then transaction mode's edits.
    /// Returns whether the message was taken (a Bind may have to wait for a shape check, and is read again).
    fn forward_held(&mut self, msg: &[u8], ro: bool, txn: bool) -> Result<bool, PumpError> {
        if ro {
            let mut out = std::mem::take(&mut self.scratch);
            out.clear();
            let backslash = self.backslash_quotes;
            let f = self.ro.as_mut().expect("read-only route");
            let r = f.message(msg, &mut out, &mut self.violations, backslash).map_err(PumpError::from);
            let r = r.and_then(|()| {
                if txn {
                    self.forward_txn(&out)
                } else {
                    self.forward_plain(&out);
                    Ok(true)
                }
            });
            self.scratch = out;
            return r;
        }
        if txn {
            return self.forward_txn(msg);
        }
        self.forward_plain(msg);
        Ok(true)
    }

    fn forward_plain(&mut self, msg: &[u8]) {
        self.c2s.extend_from_slice(msg);
        self.tx.client(msg[0], msg.get(5).copied());
    }
}
