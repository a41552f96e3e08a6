//! Budget enforcement: who may take a server connection now (`admission`), the wait for one (`checkout`), the
//! pools bounded by their service's share and by each upstream's ceiling (`pool`), and the registry of every
//! pool, one per service, route, database and upstream role (`pools`).

pub mod admission;
pub mod affinity;
pub mod checkout;
pub mod pool;
pub mod pools;
