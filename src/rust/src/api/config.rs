//! Reading the settings R sends (config lists, client data, layer sizes)
//! into the core's types, and writing results back: shared by the round's
//! adapters (`train`) and the protocol's (`protocol`).

use super::convert::{core_err, doubles_list, input_err, new_doubles, real_slice};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::compress::Compressor;
use fedagg_core::model::{Dataset, Head, Network, Precision};
use fedagg_core::strategy::fold::is_all_filtered;
use fedagg_core::strategy::{
    Aggregator, CentralNoise, ClientAlgorithm, Clip, Compression, LocalNoise, LocalOptimizer, NormFilter, RoundTransforms, ServerOptimizer,
    ServerStep,
};
use fedagg_core::protocol;
use fedagg_core::CoreError;

/// The network of a built-in model: layer sizes, head code and precision
/// bits (64 or 32).
/// A model's architecture as R gives it: the dense layer sizes (a double
/// vector), or for a convolutional network `list(sizes, input, front)`
/// with `front` a 5-row matrix of layer codes.
pub(crate) struct Arch {
    pub sizes: Vec<usize>,
    pub input: Vec<usize>,
    pub front: Vec<[usize; 5]>,
}

pub(crate) fn arch(x: &Robj) -> Result<Arch> {
    let counts = |v: &Robj, what: &str| -> Result<Vec<usize>> {
        doubles(v, what)?
            .iter()
            .map(|&s| if s.is_finite() && s >= 0.0 && s.fract() == 0.0 { Ok(s as usize) } else { Err(input_err(format!("`{what}` must hold whole numbers"))) })
            .collect()
    };
    if let Some(list) = x.as_list() {
        let get = |name: &str| list.iter().find(|(n, _)| *n == name).map(|(_, v)| v).ok_or_else(|| input_err(format!("the architecture has no `{name}`")));
        let codes = counts(&get("front")?, "front")?;
        if codes.len() % 5 != 0 {
            return Err(input_err("`front` must have five numbers per layer"));
        }
        let front = codes.chunks_exact(5).map(|c| [c[0], c[1], c[2], c[3], c[4]]).collect();
        return Ok(Arch { sizes: counts(&get("sizes")?, "sizes")?, input: counts(&get("input")?, "input")?, front });
    }
    Ok(Arch { sizes: counts(x, "sizes")?, input: Vec::new(), front: Vec::new() })
}

pub(crate) fn network(arch_obj: &Robj, head: i32, bits: i32) -> Result<Network> {
    let a = arch(arch_obj)?;
    Network::from_parts(&a.sizes, Head::from_code(head).map_err(core_err)?, Precision::from_code(bits).map_err(core_err)?, &a.input, &a.front)
        .map_err(core_err)
}

pub(crate) fn doubles<'a>(x: &'a Robj, what: &str) -> Result<&'a [f64]> {
    real_slice(x).ok_or_else(|| input_err(format!("`{what}` must be a double vector")))
}

/// The `(x, y)` pairs of a list of client data (NULL stays None), held here
/// so that `datasets()` can borrow their memory.
pub(crate) fn data_objects(list: &List, what: &str) -> Result<Vec<Option<(Robj, Robj)>>> {
    list.values()
        .map(|obj| {
            if obj.is_null() {
                return Ok(None);
            }
            let pair = List::try_from(&obj).ok().filter(|l| l.len() == 2);
            let pair = pair.ok_or_else(|| input_err(format!("each element of `{what}` must be list(x, y)")))?;
            Ok(Some((pair.elt(0)?, pair.elt(1)?)))
        })
        .collect()
}

/// Borrows R's column-major matrices and label vectors, on R's thread and
/// before any parallel work: the data are never copied whole.
pub(crate) fn datasets<'a>(objects: &'a [Option<(Robj, Robj)>]) -> Result<Vec<Option<Dataset<'a>>>> {
    objects
        .iter()
        .map(|pair| {
            let Some((x, y)) = pair else { return Ok(None) };
            let dim: Vec<usize> = x.dim().map(|d| d.iter().map(|v| Option::<i32>::from(v).unwrap_or(0).max(0) as usize).collect()).unwrap_or_default();
            if dim.len() != 2 {
                return Err(input_err("a client's `x` must be a matrix"));
            }
            let data = Dataset::new(doubles(x, "x")?, dim[0], dim[1], doubles(y, "y")?).map_err(core_err)?;
            Ok(Some(data))
        })
        .collect()
}

pub(crate) fn field(config: &List, name: &str) -> Result<Robj> {
    config
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .ok_or_else(|| input_err(format!("config has no `{name}`")))
}

/// A field that may be NULL, where absent means NULL too: R drops a list
/// element assigned NULL with `$<-`.
pub(crate) fn nullable_field(config: &List, name: &str) -> Robj {
    config.iter().find(|(n, _)| *n == name).map_or_else(|| ().into(), |(_, v)| v)
}

/// A double, or an integer (R's `length()` and `5L` are integers).
pub(crate) fn number(config: &List, name: &str) -> Result<f64> {
    let value = field(config, name)?;
    value
        .as_real()
        .or_else(|| value.as_integer().map(f64::from))
        .ok_or_else(|| input_err(format!("config `{name}` must be a number")))
}

/// A client failure as data, so R can raise a classed error naming the
/// client: `kind` is "client" (its data or setup) or "diverged" (its
/// training blew up). Other errors are raised as R errors by `core_err`, and
/// so is a filter that dropped every client: a `[filter]` error about no
/// client in particular.
pub(crate) fn client_failure(e: CoreError) -> Result<List> {
    if is_all_filtered(&e) {
        let CoreError::Client(_, message) = e else { unreachable!("is_all_filtered matches client errors") };
        return Err(extendr_api::Error::Other(format!("[filter] {message}")));
    }
    let kind = e.kind();
    match e {
        CoreError::Client(k, message) | CoreError::ClientDiverged(k, message) => {
            Ok(list!(ok = false, client = k as i32 + 1, message = message, kind = kind))
        }
        other => Err(core_err(other)),
    }
}

/// Doubles from an R double or integer vector (R users write `epochs = 2L`).
pub(crate) fn numbers(x: &Robj, what: &str) -> Result<Vec<f64>> {
    if let Some(v) = x.as_real_slice() {
        return Ok(v.to_vec());
    }
    if let Some(v) = x.as_integer_slice() {
        return Ok(v.iter().map(|&i| i as f64).collect());
    }
    Err(input_err(format!("`{what}` must be a numeric vector")))
}

/// NULL or a double vector, borrowed.
pub(crate) fn optional_doubles<'a>(x: &'a Robj, what: &str) -> Result<Option<&'a [f64]>> {
    if x.is_null() {
        Ok(None)
    } else {
        doubles(x, what).map(Some)
    }
}

pub(crate) fn text(config: &List, name: &str) -> Result<String> {
    field(config, name)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| input_err(format!("config `{name}` must be a string")))
}

pub(crate) fn flag(config: &List, name: &str) -> Result<bool> {
    field(config, name)?.as_bool().ok_or_else(|| input_err(format!("config `{name}` must be TRUE or FALSE")))
}

/// The elements of an R list of optional double vectors (NULL: none at
/// all), kept alive while their slices are borrowed.
pub(crate) fn list_elements(x: &Robj, what: &str) -> Result<Vec<Robj>> {
    if x.is_null() {
        return Ok(Vec::new());
    }
    let list = x.as_list().ok_or_else(|| input_err(format!("`{what}` must be a list")))?;
    Ok(list.values().collect())
}

/// Borrows `elements` as optional vectors; an empty list means `n` absent
/// ones (all zeros).
pub(crate) fn optional_vectors<'a>(elements: &'a [Robj], n: usize, what: &str) -> Result<Vec<Option<&'a [f64]>>> {
    if elements.is_empty() {
        return Ok(vec![None; n]);
    }
    if elements.len() != n {
        return Err(input_err(format!("`{what}` has {} elements for {n} clients", elements.len())));
    }
    elements.iter().map(|e| optional_doubles(e, what)).collect()
}

pub(crate) fn local_optimizer(config: &List) -> Result<LocalOptimizer> {
    protocol::optimizer_named(&text(config, "optimizer")?, |f| number(config, f).map_err(as_core)).map_err(core_err)
}

pub(crate) fn client_algorithm(config: &List) -> Result<ClientAlgorithm> {
    protocol::algorithm_named(&text(config, "algorithm")?, |f| number(config, f).map_err(as_core)).map_err(core_err)
}

/// An R-side reading error carried through the core's name lookups.
pub(crate) fn as_core(e: extendr_api::Error) -> CoreError {
    CoreError::InvalidArgument("config", e.to_string())
}

/// The R objects of config `server`, held while their state is borrowed.
pub(crate) struct ServerObjects {
    settings: List,
    m: Robj,
    v: Robj,
}

impl ServerObjects {
    pub(crate) fn new(config: &List) -> Result<Self> {
        let settings = field(config, "server")?.as_list().ok_or_else(|| input_err("config `server` must be a list"))?;
        let (m, v) = (nullable_field(&settings, "m"), nullable_field(&settings, "v"));
        Ok(ServerObjects { settings, m, v })
    }

    pub(crate) fn step(&self) -> Result<ServerStep<'_>> {
        let s = &self.settings;
        let lr = number(s, "lr")?;
        let optimizer = match text(s, "kind")?.as_str() {
            "sgd" => ServerOptimizer::Sgd { lr, momentum: number(s, "momentum")? },
            "adagrad" => ServerOptimizer::Adagrad { lr, beta1: number(s, "beta1")?, tau: number(s, "tau")? },
            "adam" => ServerOptimizer::Adam { lr, beta1: number(s, "beta1")?, beta2: number(s, "beta2")?, tau: number(s, "tau")? },
            "yogi" => ServerOptimizer::Yogi { lr, beta1: number(s, "beta1")?, beta2: number(s, "beta2")?, tau: number(s, "tau")? },
            other => return Err(input_err(format!("config `server$kind` \"{other}\" is not a known server optimizer"))),
        };
        Ok(ServerStep { optimizer, m: optional_doubles(&self.m, "server$m")?, v: optional_doubles(&self.v, "server$v")? })
    }
}

/// A number of `list`, or `None` when NULL or absent.
pub(crate) fn optional_number(list: &List, name: &str, what: &str) -> Result<Option<f64>> {
    let value = nullable_field(list, name);
    if value.is_null() {
        return Ok(None);
    }
    value
        .as_real()
        .or_else(|| value.as_integer().map(f64::from))
        .map(Some)
        .ok_or_else(|| input_err(format!("config `{what}${name}` must be a number or NULL")))
}

pub(crate) fn required_number(list: &List, name: &str, what: &str) -> Result<f64> {
    optional_number(list, name, what)?.ok_or_else(|| input_err(format!("config `{what}${name}` must be a number")))
}

/// A count (a whole number >= 0) of `list`, or `None` when NULL or absent.
pub(crate) fn optional_count(list: &List, name: &str, what: &str) -> Result<Option<usize>> {
    match optional_number(list, name, what)? {
        None => Ok(None),
        Some(x) if x.is_finite() && x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
        Some(x) => Err(input_err(format!("config `{what}${name}` = {x} is not a whole number >= 0"))),
    }
}

/// TRUE or FALSE of `list`; NULL or absent is FALSE.
pub(crate) fn optional_flag(list: &List, name: &str, what: &str) -> Result<bool> {
    let value = nullable_field(list, name);
    if value.is_null() {
        return Ok(false);
    }
    value.as_bool().ok_or_else(|| input_err(format!("config `{what}${name}` must be TRUE or FALSE")))
}

/// Layer lengths `layer_sizes` of `list` (NULL or absent: one layer).
pub(crate) fn layer_sizes(list: &List, what: &str) -> Result<Option<Vec<usize>>> {
    let value = nullable_field(list, "layer_sizes");
    if value.is_null() {
        return Ok(None);
    }
    let sizes = numbers(&value, &format!("{what}$layer_sizes"))?;
    sizes
        .iter()
        .map(|&n| {
            if n.is_finite() && n >= 0.0 && n.fract() == 0.0 {
                Ok(n as usize)
            } else {
                Err(input_err(format!("config `{what}$layer_sizes` has {n}, not a whole number >= 0")))
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// An element of `config` that is NULL (absent) or a list.
pub(crate) fn optional_list(config: &List, name: &str) -> Result<Option<List>> {
    let value = nullable_field(config, name);
    if value.is_null() {
        return Ok(None);
    }
    value.as_list().map(Some).ok_or_else(|| input_err(format!("config `{name}` must be a list or NULL")))
}

/// The optional transforms of a round: config `attacks`, `attack_seed`,
/// `filter`, `clip`, `aggregator`, `noise` (NULL or absent: off).
pub(crate) fn round_transforms(config: &List) -> Result<RoundTransforms> {
    let mut t = RoundTransforms::default();
    let attacks = nullable_field(config, "attacks");
    if !attacks.is_null() {
        let list = attacks.as_list().ok_or_else(|| input_err("config `attacks` must be a list or NULL"))?;
        for (i, element) in list.values().enumerate() {
            if element.is_null() {
                t.attacks.push(None);
                continue;
            }
            let what = format!("attacks[[{}]]", i + 1);
            let a = element.as_list().ok_or_else(|| input_err(format!("config `{what}` must be a list or NULL")))?;
            let attack = protocol::attack_named(&text(&a, "kind")?, |f| required_number(&a, f, &what).map_err(as_core));
            t.attacks.push(Some(attack.map_err(core_err)?));
        }
    }
    // The round's attack seed travels to every node even when the server
    // knows of no attacker: a node that attacks on its own (in its own
    // process) draws from it, as the simulation would.
    let seed = nullable_field(config, "attack_seed");
    if !seed.is_null() {
        t.attack_seed = number(config, "attack_seed")? as u64;
    }
    if let Some(f) = optional_list(config, "filter")? {
        let per_layer = optional_flag(&f, "per_layer", "filter")?;
        t.filter = Some(NormFilter {
            max_norm: optional_number(&f, "max_norm", "filter")?,
            mad: optional_number(&f, "mad", "filter")?,
            per_layer,
            layer_sizes: if per_layer { layer_sizes(&f, "filter")? } else { None },
        });
    }
    if let Some(c) = optional_list(config, "clip")? {
        let per_layer = optional_flag(&c, "per_layer", "clip")?;
        t.clip = Some(Clip {
            max_norm: required_number(&c, "max_norm", "clip")?,
            per_layer,
            layer_sizes: if per_layer { layer_sizes(&c, "clip")? } else { None },
        });
    }
    if let Some(a) = optional_list(config, "aggregator")? {
        let what = "aggregator";
        t.aggregator = match text(&a, "kind")?.as_str() {
            "weighted" => Aggregator::Weighted,
            "median" => Aggregator::Median,
            "trimmed_mean" => Aggregator::TrimmedMean { trim: required_number(&a, "trim", what)? },
            "krum" => Aggregator::Krum { f: optional_count(&a, "f", what)? },
            "multi_krum" => Aggregator::MultiKrum { f: optional_count(&a, "f", what)?, m: optional_count(&a, "m", what)? },
            "geometric_median" => Aggregator::GeometricMedian {
                tol: optional_number(&a, "tol", what)?.unwrap_or(1e-8),
                max_iter: optional_count(&a, "max_iter", what)?.unwrap_or(100),
            },
            "bulyan" => Aggregator::Bulyan { f: optional_count(&a, "f", what)? },
            other => return Err(input_err(format!("config `aggregator$kind` \"{other}\" is not a known aggregator"))),
        };
    }
    if let Some(l) = optional_list(config, "local_dp")? {
        t.local_noise = Some(LocalNoise {
            clip: required_number(&l, "clip", "local_dp")?,
            sd: required_number(&l, "sd", "local_dp")?,
            seed: required_number(&l, "seed", "local_dp")? as u64,
        });
    }
    if let Some(c) = optional_list(config, "compression")? {
        t.compression = Some(Compression { compressor: compressor(&c)?, seed: required_number(&c, "seed", "compression")? as u64 });
        let residuals = list_elements(&nullable_field(config, "residuals"), "residuals")?;
        t.residuals = residuals
            .iter()
            .map(|r| if r.is_null() { Ok(None) } else { Ok(Some(doubles(r, "residuals")?.to_vec())) })
            .collect::<Result<_>>()?;
    }
    if let Some(n) = optional_list(config, "noise")? {
        t.noise = Some(CentralNoise {
            sd: required_number(&n, "sd", "noise")?,
            seed: required_number(&n, "seed", "noise")? as u64,
            denominator: required_number(&n, "denominator", "noise")?,
        });
    }
    Ok(t)
}

/// A compressor from its R description (`kind` and its settings).
pub(crate) fn compressor(c: &List) -> Result<Compressor> {
    let what = "compression";
    protocol::compressor_named(
        &text(c, "kind")?,
        |f| required_number(c, f, what).map_err(as_core),
        |f| optional_flag(c, f, what).map_err(as_core),
    )
    .map_err(core_err)
}

/// Residuals per client as an R list (NULL without error feedback).
pub(crate) fn residual_list(residuals: &[Option<Vec<f64>>]) -> Result<Robj> {
    if residuals.iter().all(Option::is_none) {
        return Ok(().into());
    }
    let values = residuals
        .iter()
        .map(|r| match r {
            Some(v) => new_doubles(v.len(), |o| o.copy_from_slice(v)),
            None => Ok(().into()),
        })
        .collect::<Result<Vec<Robj>>>()?;
    Ok(List::from_values(values).into())
}

pub(crate) fn optional_vector(x: Option<&[f64]>) -> Result<Robj> {
    match x {
        Some(v) => new_doubles(v.len(), |o| o.copy_from_slice(v)),
        None => Ok(().into()),
    }
}

pub(crate) fn optional_vector_list(x: Option<Vec<Vec<f64>>>) -> Result<Robj> {
    match x {
        Some(v) => Ok(doubles_list(v)?.into()),
        None => Ok(().into()),
    }
}

