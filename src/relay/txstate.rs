//! The transaction-state machine: what a server connection still owes, by Postgres's own rules.
//!
//! Every client message that makes the server answer is queued in the order it was forwarded; server
//! messages complete the head of the queue the way `postgres.c` processes input: one message at a time,
//! an error in an extended-protocol message (Parse/Bind/Describe/Close/Execute) makes the server skip
//! everything up to the next Sync (Query and FunctionCall included), Sync and Flush sent during COPY FROM
//! STDIN are swallowed by the copy, CopyData/CopyDone/CopyFail outside a copy are ignored. A server is
//! at a clean boundary ([`TxState::idle`]) only when nothing is owed, no extended batch is open and the
//! last ReadyForQuery said idle. When the stream does something the model cannot follow, it says so
//! ([`TxState::uncertain`]) and the connection must never be handed to another client.

use std::collections::VecDeque;

/// A client message the server will answer (or that delimits a COPY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Parse,
    Bind,
    Close,
    DescribeStatement,
    DescribePortal,
    Execute,
    Sync,
    Query,
    FunctionCall,
    CopyDone,
    CopyFail,
    /// One or more CopyData in a row (consecutive ones share an entry, so the queue stays short).
    CopyData,
}

impl Msg {
    fn extended(self) -> bool {
        matches!(
            self,
            Msg::Parse | Msg::Bind | Msg::Close | Msg::DescribeStatement | Msg::DescribePortal | Msg::Execute
        )
    }
}

/// How the server finished with a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Answered without an error.
    Ok,
    /// Answered with an error.
    Failed,
    /// Consumed without an answer: skipped while the server discarded input to Sync, or copy data.
    Skipped,
}

/// Most client messages one connection may have in flight; past it the relay stops reading the client.
pub const MAX_OUTSTANDING: usize = 65_536;

/// What the server owes and which state it is in, as far as its output shows.
#[derive(Debug, Clone)]
pub struct TxState {
    /// Owed replies, each with the relay's tag (0: none) for messages whose replies it edits.
    queue: VecDeque<(Msg, u32)>,
    /// Tagged messages the server has finished with since the last [`TxState::take_finished`].
    finished: Vec<(u32, Done)>,
    /// The server skips input until Sync (an extended message failed).
    ignoring: bool,
    /// The Query or Execute whose COPY FROM STDIN is running.
    copy_in: Option<Msg>,
    copy_out: bool,
    /// An extended batch was started and no ReadyForQuery has closed it.
    ext_open: bool,
    /// Status byte of the last ReadyForQuery: I, T or E.
    status: u8,
    /// The model lost track; the connection can serve this client but nobody after it.
    uncertain: bool,
    /// In the running COPY FROM STDIN: CopyData has been read, and a Sync after it was taken as swallowed by
    /// the copy. If the copy then fails, whether the server read that Sync depends on when the error was
    /// raised (a bad row fails at once, a constraint at the end), which its output does not show.
    copy_read_data: bool,
    copy_sync_after_data: bool,
    /// The server sent FATAL or PANIC: it is closing the connection.
    fatal: bool,
}

impl Default for TxState {
    fn default() -> Self {
        TxState {
            queue: VecDeque::new(),
            finished: Vec::new(),
            ignoring: false,
            copy_in: None,
            copy_out: false,
            ext_open: false,
            status: b'I',
            uncertain: false,
            copy_read_data: false,
            copy_sync_after_data: false,
            fatal: false,
        }
    }
}

/// Queue capacity a state keeps across checkouts (more is given back: a burst does not stay allocated).
const KEPT_CAPACITY: usize = 32;

impl TxState {
    /// A fresh state for the next server, keeping small buffers (no allocation per checkout).
    pub fn reset(&mut self) {
        let mut queue = std::mem::take(&mut self.queue);
        let mut finished = std::mem::take(&mut self.finished);
        queue.clear();
        finished.clear();
        if queue.capacity() > KEPT_CAPACITY {
            queue = VecDeque::new();
        }
        if finished.capacity() > KEPT_CAPACITY {
            finished = Vec::new();
        }
        *self = TxState { queue, finished, ..TxState::default() };
    }

    /// Whether [`Self::shrink`] has something to give back.
    pub fn holds_buffers(&self) -> bool {
        (self.queue.is_empty() && self.queue.capacity() > 0)
            || (self.finished.is_empty() && self.finished.capacity() > 0)
    }

    /// Give the buffers back while nothing is owed (an idle client holds none).
    pub fn shrink(&mut self) {
        if self.queue.is_empty() {
            self.queue = VecDeque::new();
        }
        if self.finished.is_empty() {
            self.finished = Vec::new();
        }
    }

    /// Nothing owed, no batch open, not in a transaction block: the server can go to another client.
    pub fn idle(&self) -> bool {
        self.settled() && self.status == b'I'
    }

    /// Nothing owed and no batch open (the status may still be a transaction block).
    pub fn settled(&self) -> bool {
        self.queue.is_empty()
            && !self.ext_open
            && !self.ignoring
            && self.copy_in.is_none()
            && !self.copy_out
            && !self.uncertain
            && !self.fatal
    }

    /// The server is inside a transaction block, an open extended batch or a COPY: what an idle client
    /// holds there is "idle in transaction".
    pub fn in_transaction(&self) -> bool {
        self.status != b'I' || self.ext_open || self.ignoring || self.copy_in.is_some() || !self.queue.is_empty()
    }

    /// Nothing is running on the server: it waits for the client (for data in a COPY FROM STDIN, or for the
    /// rest of an extended batch whose Parse/Bind/Describe/Close complete at once). An Execute, Query,
    /// FunctionCall or Sync still owed means the server is busy, and the client is not idle.
    pub fn awaits_client(&self) -> bool {
        !self.uncertain
            && !self.fatal
            && (self.copy_in.is_some()
                || self
                    .queue
                    .iter()
                    .all(|(m, _)| !matches!(m, Msg::Execute | Msg::Query | Msg::FunctionCall | Msg::Sync)))
    }

    /// The server skips messages until the next Sync (an extended message failed).
    pub fn skipping(&self) -> bool {
        self.ignoring
    }

    /// Status of the last ReadyForQuery.
    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn uncertain(&self) -> bool {
        self.uncertain
    }

    pub fn fatal(&self) -> bool {
        self.fatal
    }

    /// Client messages the server has not finished answering.
    pub fn outstanding(&self) -> usize {
        self.queue.len() + usize::from(self.copy_in.is_some())
    }

    /// A ReadyForQuery is owed (a Query, Sync or FunctionCall is still being answered).
    pub fn awaits_ready(&self) -> bool {
        self.queue.iter().any(|(m, _)| matches!(m, Msg::Query | Msg::Sync | Msg::FunctionCall))
    }

    /// A COPY FROM STDIN is running: the server waits for CopyData.
    pub fn copy_in(&self) -> bool {
        self.copy_in.is_some()
    }

    /// An extended batch (or a skip to Sync) is open: it needs a Sync to end. Every extended message still
    /// owed keeps the batch open, so this also covers a batch the server is still answering.
    pub fn needs_sync(&self) -> bool {
        self.ext_open || self.ignoring
    }

    /// Forward of one client message. `first` is the first body byte (Describe and Close carry 'S' or 'P').
    pub fn client(&mut self, kind: u8, first: Option<u8>) {
        self.client_tagged(kind, first, 0)
    }

    /// The tag of the message the next server reply belongs to (0: none or untagged).
    pub fn head_tag(&self) -> u32 {
        self.queue.front().map_or(0, |&(_, t)| t)
    }

    /// Tagged messages finished since the last call, in order, with how each ended.
    pub fn take_finished(&mut self) -> std::vec::Drain<'_, (u32, Done)> {
        self.finished.drain(..)
    }

    /// Whether tagged messages finished since the last [`TxState::take_finished`].
    pub fn has_finished(&self) -> bool {
        !self.finished.is_empty()
    }

    /// Pop the head, noting a tagged one as finished.
    fn pop(&mut self, done: Done) -> Option<Msg> {
        let (m, tag) = self.queue.pop_front()?;
        if tag != 0 {
            self.finished.push((tag, done));
        }
        Some(m)
    }

    /// Like [`TxState::client`], with a tag the relay gets back from [`TxState::head_tag`] while the server
    /// answers it and from [`TxState::take_finished`] once it has.
    pub fn client_tagged(&mut self, kind: u8, first: Option<u8>, tag: u32) {
        let m = match kind {
            b'P' => Msg::Parse,
            b'B' => Msg::Bind,
            b'C' => Msg::Close,
            b'D' if first == Some(b'S') => Msg::DescribeStatement,
            b'D' => Msg::DescribePortal,
            b'E' => Msg::Execute,
            b'S' => Msg::Sync,
            b'Q' => Msg::Query,
            b'F' => Msg::FunctionCall,
            b'c' => Msg::CopyDone,
            b'f' => Msg::CopyFail,
            b'd' if self.queue.back().map(|e| e.0) == Some(Msg::CopyData) => return,
            b'd' => Msg::CopyData,
            // Flush and anything else get no reply of their own.
            _ => return,
        };
        if m.extended() {
            self.ext_open = true;
        }
        self.queue.push_back((m, tag));
        self.normalize();
    }

    /// Pop what the server consumes without answering, given the state it is in now.
    fn normalize(&mut self) {
        while let Some(&(head, _)) = self.queue.front() {
            let skipped = if self.copy_in.is_some() {
                match head {
                    Msg::CopyData => {
                        self.copy_read_data = true;
                        true
                    }
                    Msg::Sync => {
                        self.copy_sync_after_data |= self.copy_read_data;
                        true
                    }
                    _ => false,
                }
            } else if self.ignoring {
                head != Msg::Sync
            } else {
                matches!(head, Msg::CopyDone | Msg::CopyFail | Msg::CopyData)
            };
            if !skipped {
                break;
            }
            self.pop(Done::Skipped);
        }
    }

    fn lost(&mut self) {
        self.uncertain = true;
    }

    /// One server message. `first` is its first body byte (the status of ReadyForQuery); `fatal` tells
    /// whether an ErrorResponse had severity FATAL or PANIC.
    pub fn server(&mut self, kind: u8, first: Option<u8>, fatal: bool) {
        if self.uncertain {
            return;
        }
        match kind {
            // Asynchronous: NoticeResponse, ParameterStatus, NotificationResponse.
            b'N' | b'S' | b'A' => return,
            b'E' if fatal => {
                self.fatal = true;
                return;
            }
            b'E' => self.error(),
            b'G' => match self.pop(Done::Ok) {
                Some(owner @ (Msg::Query | Msg::Execute)) if self.copy_in.is_none() => {
                    self.copy_in = Some(owner);
                    self.copy_read_data = false;
                    self.copy_sync_after_data = false;
                }
                _ => self.lost(),
            },
            b'C' if self.copy_in.is_some() => {
                // COPY FROM STDIN completed: the CopyDone at the head ended it.
                if self.pop(Done::Ok) != Some(Msg::CopyDone) {
                    return self.lost();
                }
                self.end_copy_in(false);
            }
            b'Z' => match self.pop(Done::Ok) {
                Some(Msg::Query | Msg::FunctionCall | Msg::Sync) if !self.copy_out => {
                    self.status = first.unwrap_or(b'I');
                    // Extended messages sent after this Query or Sync open the next batch.
                    self.ext_open = self.queue.iter().any(|(m, _)| m.extended());
                    self.ignoring = false;
                }
                _ => self.lost(),
            },
            _ => self.reply(kind),
        }
        self.normalize();
    }

    /// A reply that belongs to the message at the head of the queue.
    fn reply(&mut self, kind: u8) {
        let Some(&(head, _)) = self.queue.front() else {
            return self.lost();
        };
        let done = match (kind, head) {
            (b'1', Msg::Parse) | (b'2', Msg::Bind) | (b'3', Msg::Close) => true,
            (b't', Msg::DescribeStatement) => false,
            (b'T' | b'n', Msg::DescribeStatement | Msg::DescribePortal) => true,
            (b'T' | b'D' | b'I', Msg::Query) => false,
            (b'D', Msg::Execute) => false,
            (b'C', Msg::Query) if self.copy_out => {
                self.copy_out = false;
                false
            }
            (b'C', Msg::Query) => false,
            (b'C' | b'I' | b's', Msg::Execute) => {
                self.copy_out = false;
                true
            }
            (b'H', Msg::Query | Msg::Execute) => {
                self.copy_out = true;
                false
            }
            (b'd' | b'c', Msg::Query | Msg::Execute) if self.copy_out => false,
            (b'V', Msg::FunctionCall) => false,
            _ => return self.lost(),
        };
        if done {
            self.pop(Done::Ok);
        }
    }

    /// A non-fatal ErrorResponse.
    fn error(&mut self) {
        if self.copy_in.is_some() {
            if self.copy_sync_after_data {
                return self.lost();
            }
            // The copy failed: by a CopyFail or bad data (the CopyDone/CopyFail is dropped either way), or by
            // a non-copy message read inside the copy, or by bad data before it: those two look the same.
            match self.queue.front().map(|e| e.0) {
                Some(Msg::CopyDone | Msg::CopyFail) => {
                    self.pop(Done::Failed);
                }
                Some(_) => return self.lost(),
                None => {}
            }
            return self.end_copy_in(true);
        }
        self.copy_out = false;
        match self.queue.front().map(|e| e.0) {
            Some(m) if m.extended() => {
                self.pop(Done::Failed);
                self.ignoring = true;
            }
            Some(Msg::Query | Msg::FunctionCall | Msg::Sync) => {}
            _ => self.lost(),
        }
    }

    fn end_copy_in(&mut self, failed: bool) {
        match self.copy_in.take() {
            // A simple Query goes on to its ReadyForQuery (or its next statement).
            Some(Msg::Query) => self.queue.push_front((Msg::Query, 0)),
            // An Execute is done; after an error the server skips to Sync.
            _ => self.ignoring |= failed,
        }
    }
}

#[cfg(test)]
#[path = "txstate_tests.rs"]
mod tests;
