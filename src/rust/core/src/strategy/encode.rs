//! The client's half of a round's per-update steps: what a client does to
//! its update Delta before it sends it, in this order:
//!
//! 1. local DP: clip to a bound, add Gaussian noise (`LocalNoise`);
//! 2. a simulated attack (`Attack`): a malicious client distorts its update;
//! 3. compression (`Compression`), with its error-feedback residual.
//!
//! The server's half (norms, filter, clipping) is in `transform`, the
//! combination in `fold` and `aggregator`. Every random number a client
//! draws comes from streams fixed by (seed, the client's stream, block of
//! coordinates), so a client in another process reproduces them exactly.

use std::borrow::Cow;

use crate::parallel::min_len;
use rayon::prelude::*;

use crate::alloc::{try_filled, try_zeroed};
use crate::compress::Compressor;
use crate::error::{invalid, CoreError, CoreResult};
use crate::norms::{clip_factor, l2_norm};
use crate::rng::Rng;

/// A simulated attack on one client's update Delta.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Attack {
    /// `Delta <- -scale Delta`.
    SignFlip { scale: f64 },
    /// `Delta <- factor Delta`.
    Scale { factor: f64 },
    /// Delta replaced by N(0, sd^2) noise, drawn from the streams of
    /// (`attack_seed`, client position, block of coordinates).
    Gaussian { sd: f64 },
    /// Every coordinate of Delta set to `value`.
    SameValue { value: f64 },
}

impl Attack {
    fn check(&self, k: usize) -> CoreResult<()> {
        let (name, x) = match *self {
            Attack::SignFlip { scale } => ("scale", scale),
            Attack::Scale { factor } => ("factor", factor),
            Attack::Gaussian { sd } => ("sd", sd),
            Attack::SameValue { value } => ("value", value),
        };
        let ok = x.is_finite() && !(matches!(self, Attack::Gaussian { .. }) && x < 0.0);
        if !ok {
            return invalid("attacks", format!("element {}: `{name}` = {x} is not a finite number{}", k + 1,
                if name == "sd" { " >= 0" } else { "" }));
        }
        Ok(())
    }
}

/// Coordinates per random-number stream of the Gaussian attack.
pub(crate) const ATTACK_BLOCK: usize = 4096;

/// Mixed into the stream number of the Gaussian attack, so that its streams
/// are not those of other seeded noise even when the seeds coincide.
pub(crate) const ATTACK_STREAM_TAG: u64 = 0xA77A_C4ED_0000_0000;

/// Local DP: each client clips its update to `clip` and adds N(0, sd^2)
/// noise before sending it, so the server only ever sees noised updates.
/// The noise of client `k` comes from the streams of (`seed`, `k`, block),
/// under a tag of its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalNoise {
    pub clip: f64,
    pub sd: f64,
    pub seed: u64,
}

/// Stream tag of local DP noise, apart from the attacks' noise.
const LOCAL_DP_STREAM_TAG: u64 = 0x10CA_1D90_0000_0000;

/// A round's compression of client updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Compression {
    pub compressor: Compressor,
    /// Seed of the round's random sparsification and quantisation; client
    /// `k` draws from its own stream of it.
    pub seed: u64,
}

/// Mixed into the stream number of compression, apart from the attack and
/// local DP streams.
const COMPRESS_STREAM_TAG: u64 = 0xC0B3_5500_0000_0000;

impl Compression {
    /// Client `k`'s random numbers (`compress_update()` in R is client 0).
    pub fn rng(&self, stream: u64) -> Rng {
        Rng::new(self.seed, COMPRESS_STREAM_TAG ^ stream)
    }
}

/// One client's encoding of its update: the settings of its round and its
/// own residual. `stream` numbers its random streams: the same stream as its
/// training (its node's number; FedBuff: its dispatch), so a node in another
/// process draws the same numbers. `client` names it in errors.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClientEncoding<'a> {
    pub local_noise: Option<LocalNoise>,
    pub attack: Option<Attack>,
    pub attack_seed: u64,
    pub compression: Option<Compression>,
    /// Error feedback: the residual the client kept from its last round.
    pub residual: Option<&'a [f64]>,
    pub stream: u64,
    pub client: usize,
}

impl ClientEncoding<'_> {
    /// Nothing to do: the update is sent as computed.
    pub fn is_none(&self) -> bool {
        self.local_noise.is_none() && self.attack.is_none() && self.compression.is_none()
    }

    /// Checks the settings for updates of `d` values.
    pub fn check(&self, d: usize) -> CoreResult<()> {
        let k = self.client;
        if let Some(a) = &self.attack {
            a.check(k)?;
        }
        if let Some(l) = &self.local_noise {
            if !(l.clip.is_finite() && l.clip > 0.0) {
                return invalid("local_dp", format!("`clip` = {} is not a finite number > 0", l.clip));
            }
            if !(l.sd.is_finite() && l.sd >= 0.0) {
                return invalid("local_dp", format!("`sd` = {} is not a finite number >= 0", l.sd));
            }
        }
        if let Some(c) = &self.compression {
            c.compressor.check()?;
        }
        if self.residual.is_some_and(|r| r.len() != d) {
            return invalid("residuals", format!("element {} does not have {d} values", k + 1));
        }
        Ok(())
    }

    /// What the client sends: its update after local DP, the simulated
    /// attack and compression (decoded, as the server will read it), and its
    /// new error-feedback residual.
    pub fn encode<'u>(&self, update: Cow<'u, [f64]>) -> CoreResult<(Cow<'u, [f64]>, Option<Vec<f64>>)> {
        let (k, stream) = (self.client, self.stream);
        let mut update = update;
        if let Some(local) = &self.local_noise {
            local_dp_update(&mut update, local, stream).map_err(|e| in_client(k, e))?;
        }
        if let Some(attack) = &self.attack {
            attack_update(&mut update, attack, self.attack_seed, stream, k)?;
        }
        let mut residual = None;
        if let Some(c) = &self.compression {
            let sent = c.compressor.compress(&update, self.residual, &mut c.rng(stream)).map_err(|e| in_client(k, e))?;
            update = Cow::Owned(sent.decoded);
            residual = sent.residual;
        }
        Ok((update, residual))
    }
}

/// An update made owned, to be changed in place.
fn owned<'u>(update: &'u mut Cow<'_, [f64]>, what: &str) -> CoreResult<&'u mut Vec<f64>> {
    crate::alloc::make_owned(update, what)
}

/// What client `k` sends under local DP: its update clipped to `local.clip`
/// (overflow-safe norm), plus N(0, sd^2) noise per coordinate.
fn local_dp_update(update: &mut Cow<'_, [f64]>, local: &LocalNoise, stream: u64) -> CoreResult<()> {
    let factor = clip_factor(l2_norm(update), local.clip);
    let values = owned(update, "a locally private client update")?;
    let mut noise = try_zeroed(values.len(), "local DP noise")?;
    noise.par_chunks_mut(ATTACK_BLOCK).enumerate().with_min_len(min_len()).for_each(|(b, block)| {
        let mut rng = Rng::new(local.seed, LOCAL_DP_STREAM_TAG ^ (stream << 24) ^ b as u64);
        for v in block.iter_mut() {
            *v = local.sd * rng.normal();
        }
    });
    for (v, z) in values.iter_mut().zip(&noise) {
        *v = *v * factor + z;
    }
    Ok(())
}

/// Client `k`'s update after `attack`.
fn attack_update(update: &mut Cow<'_, [f64]>, attack: &Attack, seed: u64, stream: u64, k: usize) -> CoreResult<()> {
    let d = update.len();
    let what = "an attacked client update";
    match *attack {
        Attack::SignFlip { scale } => owned(update, what)?.iter_mut().for_each(|v| *v *= -scale),
        Attack::Scale { factor } => owned(update, what)?.iter_mut().for_each(|v| *v *= factor),
        Attack::SameValue { value } => *update = Cow::Owned(try_filled(d, value, what)?),
        Attack::Gaussian { sd } => {
            let mut noise = try_zeroed(d, what)?;
            gaussian_fill(&mut noise, sd, seed, stream);
            *update = Cow::Owned(noise);
        }
    }
    if let Some(i) = update.iter().position(|v| !v.is_finite()) {
        return Err(CoreError::Client(k, format!("the simulated attack made value {} of the update {}", i + 1, update[i])));
    }
    Ok(())
}

/// `x[j] = sd * z_j` with z from the streams of (`seed`, `client`, block of
/// `ATTACK_BLOCK` coordinates): the same numbers on any number of threads.
pub fn gaussian_fill(x: &mut [f64], sd: f64, seed: u64, client: u64) {
    x.par_chunks_mut(ATTACK_BLOCK).enumerate().with_min_len(min_len()).for_each(|(b, block)| {
        let mut rng = Rng::new(seed, ATTACK_STREAM_TAG ^ (client << 24) ^ b as u64);
        for v in block.iter_mut() {
            *v = sd * rng.normal();
        }
    });
}

/// An error of the transforms of client `k`'s update, attributed to it.
fn in_client(k: usize, e: CoreError) -> CoreError {
    match e {
        CoreError::InvalidArgument(arg, msg) => CoreError::Client(k, format!("`{arg}` {msg}")),
        other => other,
    }
}
