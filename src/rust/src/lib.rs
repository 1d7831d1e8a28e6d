//! R entry points of fedagg. The numbers are computed in the `fedagg-core`
//! crate; `api/` holds the thin adapters between R objects and that core.

mod api;

use api::{aggregate, drift, net, norms, privacy, protocol, threads, train};
use extendr_api::prelude::*;

extendr_module! {
    mod fedagg;
    use aggregate;
    use drift;
    use net;
    use norms;
    use privacy;
    use protocol;
    use threads;
    use train;
}
