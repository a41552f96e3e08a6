//! Budget enforcement: who may take a server connection now (`admission`), the wait for one (`checkout`), and
//! the per-service pools bounded by their share and by each upstream's ceiling (`pool`).

pub mod admission;
pub mod checkout;
pub mod pool;
