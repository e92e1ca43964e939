//! Nembo's pure core: the task model, the replicated state machine and the
//! scheduler. Nothing here does I/O, reads a clock or draws randomness, so
//! every decision can be tested, replayed and compared across replicas.
#![deny(missing_docs)]

pub mod access;
pub mod cost;
pub mod health;
pub mod optimizer;
pub mod scheduler;
pub mod serve;
pub mod state;
pub mod task;
