//! Budget enforcement: who may take a server connection now (`admission`), the wait for one (`checkout`), the
//! pools bounded by their service's share and by each upstream's ceiling (`pool`), and the registry of every
//! pool, one per service, route, database and upstream role (`pools`); a pool's operator state (`control`:
//! paused, killed) and the proxy-issued cancel keys that route a CancelRequest to the server a client holds or
//! wake it from the queue (`cancel`); transaction mode's queue of waiting checkouts (`handoff`), a checkout
//! waiting in it as the relay loop's own state (`queued`), and the one-shot signals sessions wait on
//! (`signal`).

pub mod admission;
pub mod affinity;
pub mod cancel;
pub mod checkout;
pub mod control;
pub mod handoff;
pub mod pool;
pub mod pools;
pub mod queued;
pub mod signal;
