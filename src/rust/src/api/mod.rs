//! Thin `#[extendr]` adapters. Inputs arrive validated and coerced by the R
//! front-end; these functions borrow R's memory, call the core, and shape the
//! result. All are internal (`rs_*`): the public API is the R layer.

pub mod aggregate;
pub mod drift;
pub mod net;
pub mod norms;
pub mod privacy;
pub mod protocol;
pub mod threads;
pub mod train;
mod config;
mod convert;
