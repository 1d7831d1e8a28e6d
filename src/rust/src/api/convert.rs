//! Borrowing R objects as core types.

use extendr_api::prelude::*;
use extendr_api::{rtype_to_sxp, Error, Result};
use fedagg_core::{alloc, CoreError, UpdateSet};

/// Turns a core error into an extendr error (an R error with this message).
/// The message starts with the error's class in brackets, `[input] `,
/// `[client] `, `[memory] ` or `[diverged] `: the R side reads the tag back
/// and raises a condition of class `fedagg_error_<tag>`.
pub fn core_err(e: CoreError) -> Error {
    Error::Other(format!("[{}] {e}", e.kind()))
}

/// An input problem the adapters find themselves, tagged like the core's.
pub fn input_err(msg: impl std::fmt::Display) -> Error {
    Error::Other(format!("[input] {msg}"))
}

/// The elements of a layer list, kept alive while slices borrow from them.
///
/// `layers` is a list with one element per layer; each element is either a
/// list of one double vector per client, or one double vector holding all
/// clients back to back (the columns of a matrix).
pub struct LayerObjects {
    layers: Vec<Vec<Robj>>,
    n_clients: usize,
}

impl LayerObjects {
    pub fn new(layers: &List, n_clients: usize) -> Result<Self> {
        let layers = layers
            .values()
            .map(|layer| match layer.as_list() {
                Some(clients) => Ok(clients.values().collect()),
                None if layer.is_real() => Ok(vec![layer]),
                None => Err(input_err("each layer must be a list or a double vector")),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, n_clients })
    }

    /// Borrows every client's slice of every layer, without copying.
    pub fn update_set(&self) -> Result<UpdateSet<'_>> {
        let mut out = Vec::with_capacity(self.layers.len());
        for (l, objs) in self.layers.iter().enumerate() {
            let slices = objs
                .iter()
                .map(|o| real_slice(o).ok_or_else(|| input_err(format!("layer {} is not double", l + 1))))
                .collect::<Result<Vec<&[f64]>>>()?;
            if slices.len() == 1 && self.n_clients > 1 {
                let all = slices[0];
                if all.len() % self.n_clients != 0 {
                    return Err(input_err(format!("layer {} does not split into {} clients", l + 1, self.n_clients)));
                }
                let d = all.len() / self.n_clients;
                // A zero-length layer still needs one (empty) slice per client.
                out.push((0..self.n_clients).map(|k| &all[k * d..(k + 1) * d]).collect());
            } else {
                out.push(slices);
            }
        }
        UpdateSet::new(out).map_err(core_err)
    }
}

/// A fresh R double vector filled by `fill`, written in place (no copy).
/// The size is checked first: R's own allocation failure would unwind
/// through these Rust frames.
pub fn new_doubles(len: usize, fill: impl FnOnce(&mut [f64])) -> Result<Robj> {
    alloc::check_request::<f64>(len, "a result vector").map_err(core_err)?;
    let mut robj = Robj::alloc_vector(rtype_to_sxp(Rtype::Doubles), len);
    fill(robj.as_real_slice_mut().expect("a freshly allocated double vector"));
    Ok(robj)
}

/// A list of R double vectors from owned buffers.
pub fn doubles_list(values: Vec<Vec<f64>>) -> Result<List> {
    let vectors = values.into_iter().map(|v| new_doubles(v.len(), |o| o.copy_from_slice(&v))).collect::<Result<Vec<_>>>()?;
    Ok(List::from_values(vectors))
}

/// Thread count from R (0 = all cores).
pub fn threads(n: i32) -> usize {
    n.max(0) as usize
}

/// A double vector's values, borrowed read-only. Unlike `as_real_slice()`,
/// this never makes R copy the data: a writable pointer into a shared
/// vector behind an ALTREP wrapper forces a copy, a read-only one does not.
pub fn real_slice(x: &Robj) -> Option<&[f64]> {
    if !x.is_real() {
        return None;
    }
    let len = x.len();
    if len == 0 {
        return Some(&[]);
    }
    // SAFETY: `x` is a double vector of `len` values, kept alive (and
    // protected) by the borrow of `x`, and R never moves vector data.
    unsafe {
        let data = extendr_ffi::DATAPTR_RO(x.get()) as *const f64;
        Some(std::slice::from_raw_parts(data, len))
    }
}

/// Optional weights: R passes NULL or a double vector.
pub fn optional_slice(x: &Robj) -> Option<&[f64]> {
    if x.is_null() {
        None
    } else {
        real_slice(x)
    }
}
